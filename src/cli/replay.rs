//! `ekid replay`: streams a CSV series into a running daemon over HTTP.
//!
//! The stream is created on first use (options from the flags, the scale fixed to the file's
//! range so the predictions match `ekid eval`), and a replay resumes where the stream stands:
//! every observation carries its 1-based row as `seq`, so the run starts at `last_seq + 1` and a
//! retried batch is idempotent (the daemon skips sequence numbers it has already applied).

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde_json::Value;

use super::flags::ReplayArgs;
use crate::engine::Scaler;
use crate::engine::{Options, Range, RawOptions, ScaleOption};
use crate::eval;

/// Attempts per request before giving up on connection errors, timeouts and 5xx.
const TRIES: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured; a larger one is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Sequence gaps in a row without progress before giving up.
const MAX_GAPS: u32 = 8;

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate must be a finite number > 0, got {r}");
    }
    let name = match &args.stream {
        Some(n) => n.clone(),
        None => stream_name_from(&args.file)?,
    };
    check_name(&name)?;
    let flags = args.options.to_raw(&Options::default())?;
    if flags.inputs.is_some_and(|i| i != 0) || flags.outputs.is_some_and(|o| o != 1) {
        bail!("replay reads one column: --inputs must be 0 and --outputs 1");
    }
    let series = eval::read_series(&args.file, args.column.as_deref())
        .with_context(|| format!("reading {}", args.file.display()))?;
    let values = &series.values;
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("EKID_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let progress = progress_bar(&name, values.len())?;
    // Cleared on every way out, so an error is not printed after a half-drawn bar.
    let _clear = ClearOnDrop(progress.clone());
    let api = Api::new(&args.server, &name, token, progress)?;

    let info = find_or_create(&api, &name, &args, &flags, values)?;
    let n = values.len() as u64;
    let start_seq = info.stats.last_seq;
    if start_seq > n {
        bail!(
            "stream `{name}` is at seq {start_seq}, past the {n} rows of {}: wrong file or stream?",
            args.file.display()
        );
    }
    let mut out = match &args.predictions {
        Some(path) => Some(PredictionsFile::create(path)?),
        None => None,
    };
    let batch = match args.rate {
        // One batch holds at most about a second of data.
        Some(r) => args.batch.min((r.floor() as usize).max(1)),
        None => args.batch,
    };
    api.progress.set_position(start_seq);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut next = start_seq; // 0-based index of the next row = the last applied seq
    let mut gaps = 0;
    while next < n {
        if let Some(r) = args.rate {
            let due = started + Duration::from_secs_f64(tally.sent as f64 / r);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let (lo, hi) = (next as usize, (next as usize + batch).min(values.len()));
        match api.post(ndjson_rows(values, lo, hi))? {
            Posted::Applied(reply) => {
                gaps = 0;
                tally.record(reply, values, lo, hi, out.as_mut())?;
                next = hi as u64;
            }
            Posted::Gap(detail) => {
                gaps += 1;
                let now = api
                    .get_stream()?
                    .with_context(|| format!("stream `{name}` disappeared during the replay"))?
                    .stats
                    .last_seq;
                if now < next {
                    bail!(
                        "stream `{name}` went back from seq {next} to {now} during the replay \
                         (was it deleted and created again?): {detail}"
                    );
                }
                if gaps > MAX_GAPS {
                    bail!("giving up after {MAX_GAPS} sequence gaps in a row: {detail}");
                }
                tally.lost += now.min(n) - next;
                next = now;
            }
        }
        api.progress.set_position(next.min(n));
    }
    let elapsed = started.elapsed().as_secs_f64();
    api.progress.finish_and_clear();
    let stats = api
        .get_stream()
        .context("reading the final statistics")?
        .with_context(|| format!("stream `{name}` disappeared at the end of the replay"))?
        .stats;
    tally.report(&name, elapsed, &stats, out.is_some());
    Ok(())
}

/// A bar on a terminal, nothing elsewhere.
fn progress_bar(name: &str, rows: usize) -> anyhow::Result<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::with_draw_target(Some(rows as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} eta {eta} {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_owned());
    Ok(bar)
}

/// The stream as the daemon has it, checked against the flags; or created from them, its scale
/// the range of the whole file (as `ekid eval` scales it) unless `--scale` says otherwise.
fn find_or_create(
    api: &Api,
    name: &str,
    args: &ReplayArgs,
    flags: &RawOptions,
    values: &[f64],
) -> anyhow::Result<StreamInfo> {
    if let Some(info) = api.get_stream()? {
        let step_flags = (
            args.options.step_h.is_some(),
            args.options.step_eps.is_some(),
        );
        check_existing(name, &info, flags, step_flags)?;
        return Ok(info);
    }
    let mut raw = flags.clone();
    if raw.scale.is_none() {
        let s = Scaler::fit(values);
        raw.scale = Some(ScaleOption::Fixed(Range {
            min: s.min,
            max: s.max,
        }));
    }
    api.put_stream(&raw)
}

/// Rows `lo..hi` as NDJSON, each with its 1-based row as `seq`.
fn ndjson_rows(values: &[f64], lo: usize, hi: usize) -> String {
    let mut body = String::with_capacity((hi - lo) * 32);
    for (i, y) in values[lo..hi].iter().enumerate() {
        let line = serde_json::json!({"seq": lo + i + 1, "y": y});
        body.push_str(&line.to_string());
        body.push('\n');
    }
    body
}

/// `--predictions`: `seq,y,prediction`, flushed after every batch.
struct PredictionsFile {
    writer: csv::Writer<std::fs::File>,
    path: std::path::PathBuf,
}

impl PredictionsFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let mut writer =
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
        writer.write_record(["seq", "y", "prediction"])?;
        Ok(PredictionsFile {
            writer,
            path: path.to_owned(),
        })
    }

    fn write(&mut self, seq: u64, y: f64, prediction: Option<f64>) -> anyhow::Result<()> {
        let cell = prediction.map_or(String::new(), |p| p.to_string());
        self.writer
            .write_record([seq.to_string(), y.to_string(), cell])?;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.writer
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// What this run has sent and what the daemon made of it.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    duplicates: u64,
    /// Rows applied without their prediction reaching this run (another writer, or a retried
    /// batch whose first reply was lost).
    lost: u64,
    sent: u64,
}

impl Tally {
    /// Counts an applied batch of rows `lo..hi` and writes each row's prediction.
    fn record(
        &mut self,
        reply: ObserveReply,
        values: &[f64],
        lo: usize,
        hi: usize,
        mut out: Option<&mut PredictionsFile>,
    ) -> anyhow::Result<()> {
        self.accepted += reply.accepted;
        self.duplicates += reply.duplicates;
        self.sent += (hi - lo) as u64;
        let mut preds = reply.predictions.into_iter().peekable();
        for row in lo..hi {
            let seq = row as u64 + 1;
            while preds.peek().is_some_and(|p| p.seq < seq) {
                preds.next();
            }
            let Some(p) = preds.next_if(|p| p.seq == seq) else {
                // Applied by an earlier attempt whose reply was lost.
                self.lost += 1;
                continue;
            };
            if let Some(w) = out.as_deref_mut() {
                let prediction = match p.prediction {
                    None => None,
                    Some(v) => Some(prediction_value(&v, seq)?),
                };
                w.write(seq, values[row], prediction)?;
            }
        }
        if let Some(w) = out {
            w.flush()?;
        }
        Ok(())
    }

    fn report(&self, name: &str, elapsed: f64, stats: &Stats, writing: bool) {
        let Tally {
            accepted,
            duplicates,
            lost,
            ..
        } = self;
        let per_s = if elapsed > 0.0 {
            *accepted as f64 / elapsed
        } else {
            0.0
        };
        let mse = stats.mse.map_or("n/a".to_owned(), |m| format!("{m:.3}"));
        let scaled = stats
            .mse_scaled
            .map_or("n/a".to_owned(), |m| format!("{m:.1e}"));
        eprintln!(
            "replayed {accepted} observations into `{name}` ({duplicates} duplicates) in {elapsed:.2} s, \
             {per_s:.0} obs/s; prequential mse {mse} (scaled {scaled})"
        );
        if *lost > 0 && writing {
            eprintln!(
                "note: {lost} rows were applied without their prediction reaching this run \
                 (another writer, or a retried batch); they are missing from the predictions file"
            );
        }
    }
}

struct ClearOnDrop(ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// The file stem with every character outside `[A-Za-z0-9_.-]` as `_`, at most 64 long.
pub fn stream_name_from(file: &Path) -> anyhow::Result<String> {
    let stem = file
        .file_stem()
        .with_context(|| format!("{} has no file name: pass --stream", file.display()))?;
    let name: String = stem
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Ok(name)
}

/// The daemon's rule for names; checked here too because the name goes into URLs.
fn check_name(name: &str) -> anyhow::Result<()> {
    if !crate::storage::is_valid_stream_name(name) {
        bail!(
            "{}, got `{name}`: pass --stream",
            crate::storage::STREAM_NAME_RULE
        );
    }
    Ok(())
}

/// Fails when an option given on the command line differs from the existing stream's.
fn check_existing(
    name: &str,
    info: &StreamInfo,
    flags: &RawOptions,
    step_flags: (bool, bool),
) -> anyhow::Result<()> {
    if let Some(f) = &info.failed {
        bail!("stream `{name}` has failed and takes no more observations: {f}");
    }
    let inputs = info.options.get("inputs").and_then(Value::as_u64);
    let outputs = info.options.get("outputs").and_then(Value::as_u64);
    if inputs.is_some_and(|i| i != 0) || outputs.is_some_and(|o| o != 1) {
        bail!(
            "stream `{name}` has {} inputs and {} outputs; replay feeds one column (0 and 1)",
            inputs.unwrap_or_default(),
            outputs.unwrap_or_default()
        );
    }
    let given = serde_json::to_value(flags).context("encoding the options")?;
    let Value::Object(given) = given else {
        return Ok(());
    };
    let mut diffs = Vec::new();
    for (key, want) in given.iter().filter(|(_, v)| !v.is_null()) {
        let have = info.options.get(key).unwrap_or(&Value::Null);
        if key == "step" {
            // `--step-h` alone fills `eps` from the built-in default: compare only what was given.
            for (k, given) in [("h", step_flags.0), ("eps", step_flags.1)] {
                if let Some(w) = want.get(k).filter(|_| given) {
                    let h = have.get(k).unwrap_or(&Value::Null);
                    if !same(w, h) {
                        diffs.push(format!("step.{k} is {h}, the flags say {w}"));
                    }
                }
            }
        } else if !same(want, have) {
            diffs.push(format!("{key} is {have}, the flags say {want}"));
        }
    }
    if !diffs.is_empty() {
        bail!(
            "stream `{name}` exists with other options ({}); replay uses an existing stream as \
             it is: drop those flags, or replay into a new --stream",
            diffs.join("; ")
        );
    }
    Ok(())
}

/// JSON values equal, numbers compared as numbers (`1` and `1.0` alike).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

/// The single prediction of an observation.
fn prediction_value(v: &[f64], seq: u64) -> anyhow::Result<f64> {
    let [one] = v else {
        bail!("seq {seq}: expected one predicted value, got {}", v.len());
    };
    Ok(*one)
}

// ---------------------------------------------------------------------------------------------
// The daemon's replies, as far as replay reads them.

#[derive(Debug, Deserialize)]
struct StreamInfo {
    options: Value,
    stats: Stats,
    #[serde(default)]
    failed: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Stats {
    last_seq: u64,
    mse: Option<f64>,
    mse_scaled: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct ObserveReply {
    accepted: u64,
    duplicates: u64,
    predictions: Vec<PredictionIn>,
}

/// `--predictions` must match `ekid eval` bit for bit: serde_json parses floats correctly
/// rounded here because the crate enables its `float_roundtrip` feature.
#[derive(Debug, Deserialize)]
struct PredictionIn {
    seq: u64,
    prediction: Option<Vec<f64>>,
}

/// An RFC 9457 problem document.
#[derive(Debug, Default, Deserialize)]
struct ProblemDoc {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

enum Posted {
    Applied(ObserveReply),
    /// A sequence gap (409): the stream moved under us. Carries the problem's detail.
    Gap(String),
}

/// A reply that is not to be retried: any 2xx, 3xx or 4xx but 408 and 429.
struct Reply {
    status: StatusCode,
    body: String,
}

impl Reply {
    fn problem(&self) -> ProblemDoc {
        serde_json::from_str(&self.body).unwrap_or_default()
    }

    /// A one-line description of an error reply.
    fn describe(&self) -> String {
        let p = self.problem();
        let mut s = self.status.to_string();
        match (p.detail, p.title) {
            (Some(d), _) => s = format!("{s}: {d}"),
            (None, Some(t)) => s = format!("{s}: {t}"),
            (None, None) if !self.body.trim().is_empty() => {
                s = format!(
                    "{s}: {}",
                    self.body.trim().chars().take(200).collect::<String>()
                );
            }
            _ => {}
        }
        if self.status == StatusCode::UNAUTHORIZED || self.status == StatusCode::FORBIDDEN {
            s.push_str(" (pass --token or set EKID_TOKEN)");
        }
        s
    }
}

struct Api {
    client: Client,
    /// `{server}/v1/streams/{name}`
    stream_url: String,
    token: Option<String>,
    progress: ProgressBar,
}

impl Api {
    fn new(
        server: &str,
        name: &str,
        token: Option<String>,
        progress: ProgressBar,
    ) -> anyhow::Result<Api> {
        let base = reqwest::Url::parse(server)
            .with_context(|| format!("--server: `{server}` is not a URL"))?;
        if !matches!(base.scheme(), "http" | "https") {
            bail!("--server: expected an http:// URL, got `{server}`");
        }
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Longer than the daemon's own request timeout, so its 503 arrives first.
            .timeout(Duration::from_secs(120))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            stream_url: format!("{}/v1/streams/{name}", server.trim_end_matches('/')),
            token,
            progress,
        })
    }

    fn get_stream(&self) -> anyhow::Result<Option<StreamInfo>> {
        let r = self.send(reqwest::Method::GET, &self.stream_url, None)?;
        match r.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => serde_json::from_str(&r.body)
                .map(Some)
                .with_context(|| format!("GET {}: unexpected reply", self.stream_url)),
            _ => bail!("GET {}: {}", self.stream_url, r.describe()),
        }
    }

    fn put_stream(&self, options: &RawOptions) -> anyhow::Result<StreamInfo> {
        let mut body = serde_json::to_value(options).context("encoding the options")?;
        if let Value::Object(m) = &mut body {
            m.retain(|_, v| !v.is_null());
        }
        let bytes = serde_json::to_vec(&body).context("encoding the options")?;
        let r = self.send(
            reqwest::Method::PUT,
            &self.stream_url,
            Some(("application/json", bytes)),
        )?;
        if !r.status.is_success() {
            bail!(
                "creating the stream: PUT {}: {}",
                self.stream_url,
                r.describe()
            );
        }
        serde_json::from_str(&r.body)
            .with_context(|| format!("PUT {}: unexpected reply", self.stream_url))
    }

    fn post(&self, ndjson: String) -> anyhow::Result<Posted> {
        let url = format!("{}/observations", self.stream_url);
        let r = self.send(
            reqwest::Method::POST,
            &url,
            Some(("application/x-ndjson", ndjson.into_bytes())),
        )?;
        if r.status.is_success() {
            return serde_json::from_str(&r.body)
                .map(Posted::Applied)
                .with_context(|| format!("POST {url}: unexpected reply"));
        }
        if r.status == StatusCode::CONFLICT
            && r.problem()
                .kind
                .is_some_and(|k| k.ends_with("/problems/seq-gap"))
        {
            return Ok(Posted::Gap(r.describe()));
        }
        bail!("POST {url}: {}", r.describe())
    }

    /// Sends a request, retrying connection errors, timeouts, 408, 429 and 5xx with exponential
    /// backoff (or the server's `Retry-After`); returns any other reply.
    fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> anyhow::Result<Reply> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let mut req = self.client.request(method.clone(), url);
            if let Some(t) = &self.token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            if let Some((ct, bytes)) = &body {
                req = req.header(CONTENT_TYPE, *ct).body(bytes.clone());
            }
            let (why, wait) = match req.send() {
                Ok(res) => {
                    let status = res.status();
                    let retry_after = retry_after(res.headers());
                    match res.text() {
                        Ok(text) => {
                            let reply = Reply { status, body: text };
                            let retry = status.is_server_error()
                                || status == StatusCode::REQUEST_TIMEOUT
                                || status == StatusCode::TOO_MANY_REQUESTS;
                            if !retry {
                                return Ok(reply);
                            }
                            (reply.describe(), retry_after)
                        }
                        Err(e) => (
                            format!("{status}, then reading the reply failed: {e}"),
                            None,
                        ),
                    }
                }
                Err(e) => (error_chain(&e), None),
            };
            if attempt >= TRIES {
                bail!("{method} {url}: {why} (gave up after {TRIES} attempts)");
            }
            let wait = wait.unwrap_or(backoff);
            self.progress
                .set_message(format!("retrying in {:.1} s: {why}", wait.as_secs_f64()));
            std::thread::sleep(wait);
            self.progress.set_message("");
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// An error with its causes, `a: b: c` (reqwest's top-level message alone hides the reason).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_from_file_stems() {
        let name = |p: &str| stream_name_from(Path::new(p)).unwrap();
        assert_eq!(
            name("datasets/daily-min-temperatures.csv"),
            "daily-min-temperatures"
        );
        assert_eq!(name("/tmp/my data (v2).csv"), "my_data__v2_");
        assert_eq!(name("tempé.csv"), "temp_");
        assert_eq!(name(&format!("{}.csv", "x".repeat(80))).len(), 64);
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("ok.name-1_2").is_ok());
    }

    #[test]
    fn numbers_compare_as_numbers() {
        assert!(same(
            &serde_json::json!({"min": 0, "max": 1.5}),
            &serde_json::json!({"max": 1.5, "min": 0.0})
        ));
        assert!(!same(&serde_json::json!(100), &serde_json::json!(50)));
        assert!(same(&serde_json::json!("auto"), &serde_json::json!("auto")));
    }

    #[test]
    fn predictions_parse_exactly() {
        // The daemon's first prediction on the temperatures: without `float_roundtrip`
        // serde_json would read this text as 0.009404326858943749, one ulp off.
        let x = 0.009404326858943747_f64;
        let json = format!(
            r#"{{"seq": 3, "prediction": [{}]}}"#,
            serde_json::to_string(&x).unwrap()
        );
        let p: PredictionIn = serde_json::from_str(&json).unwrap();
        let v = prediction_value(p.prediction.as_deref().unwrap(), 3).unwrap();
        assert_eq!(v.to_bits(), x.to_bits());
    }
}
