//! Decoding request bodies: observations (JSON object or array, NDJSON, CSV) into
//! [`Observation`]s, and a forecast's future inputs. Pure functions over bytes: no stream state
//! is touched here. Each decoder checks what it was told to expect ([`Expect`]: the stream's
//! shape, the batch limit) row by row as it reads, so a body that is wrong or too large is
//! refused at its first bad row holding only the rows before it; JSON is read value by value,
//! never as a tree, and a row's numbers beyond what the stream takes are counted, not kept.

use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::engine::{BatchError, Observation};

/// Why a body did not decode; `line` is 1-based for NDJSON and CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub detail: String,
    pub line: Option<u64>,
    pub field: Option<String>,
}

impl DecodeError {
    fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            line: None,
            field: None,
        }
    }
    fn at_line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }
    fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

/// What a body of observations must hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expect {
    /// The stream's `(inputs, outputs)`: every observation carries that many finite numbers in
    /// `x` and `y`, and no `seq` 0 ([`Observation::check`]). `None` takes any shape, unchecked.
    pub shape: Option<(usize, usize)>,
    /// Most observations in one body.
    pub max_observations: usize,
}

impl Expect {
    /// Any shape, any number of observations.
    pub const ANY: Expect = Expect {
        shape: None,
        max_observations: usize::MAX,
    };
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    /// Not what its content type says it is.
    #[error("{}", .0.detail)]
    Malformed(DecodeError),
    /// An observation that does not fit the stream (`line`: of an NDJSON or CSV body).
    #[error("{error}")]
    Invalid {
        error: BatchError,
        line: Option<u64>,
    },
    /// More observations than [`Expect::max_observations`].
    #[error("the body holds more than {limit} observations, the limit for one request")]
    TooMany { limit: usize },
    /// A forecast's future inputs or horizon (`field`) do not fit the stream.
    #[error("{detail}")]
    Inputs { field: String, detail: String },
}

impl From<DecodeError> for BodyError {
    fn from(e: DecodeError) -> Self {
        BodyError::Malformed(e)
    }
}

/// The observation formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per line; blank lines are skipped.
    Ndjson,
    /// `text/csv`: a header row naming `y` (or `y1`, `y2`, …), optional `x` (or `x1`, …) and an
    /// optional `seq`; every other column is an error.
    Csv,
}

/// Decodes a body of observations, checking each against `expect` as it is read.
pub fn decode(format: Format, body: &[u8], expect: &Expect) -> Result<Vec<Observation>, BodyError> {
    let mut sink = Sink {
        expect,
        out: Vec::new(),
    };
    match format {
        Format::Json => json(body, &mut sink)?,
        Format::Ndjson => ndjson(body, &mut sink)?,
        Format::Csv => csv(body, &mut sink)?,
    }
    Ok(sink.out)
}

/// The memory decoding a `raw`-byte body of observations may hold, beyond the raw bytes:
/// at most `max_observations` observations, and at most one per two bytes (CSV's `1\n` is the
/// shortest), each its struct twice over (the batch's vector grows by doubling) and two heap
/// blocks as the allocator rounds them; and at most `width` numbers an observation (the
/// stream's inputs and outputs: more are counted, not kept) and one per two bytes (`1,`), 8
/// bytes each.
pub fn observations_bound(raw: usize, max_observations: usize, width: usize) -> u64 {
    const ROW: u64 = 2 * std::mem::size_of::<Observation>() as u64 + 2 * 32;
    let rows = max_observations.min(raw / 2 + 1) as u64;
    rows * ROW + numbers_bound(raw, rows, width)
}

/// The memory decoding a `raw`-byte forecast request may hold, beyond the raw bytes: the future
/// inputs, at most `max_horizon` rows of `inputs` numbers (kept flat) and one number per two
/// bytes.
pub fn forecast_bound(raw: usize, max_horizon: usize, inputs: usize) -> u64 {
    numbers_bound(raw, max_horizon.min(raw / 2 + 1) as u64, inputs)
}

fn numbers_bound(raw: usize, rows: u64, width: usize) -> u64 {
    rows.saturating_mul(width as u64).min(raw as u64 / 2 + 1) * 8
}

/// Collects observations up to the limit, checking each against the stream's shape.
struct Sink<'a> {
    expect: &'a Expect,
    out: Vec<Observation>,
}

impl Sink<'_> {
    /// Whether one more observation is allowed (asked before it is decoded where possible).
    fn room(&self) -> Result<(), BodyError> {
        if self.out.len() >= self.expect.max_observations {
            return Err(BodyError::TooMany {
                limit: self.expect.max_observations,
            });
        }
        Ok(())
    }

    fn push(&mut self, row: Row, line: Option<u64>) -> Result<(), BodyError> {
        self.room()?;
        let index = self.out.len();
        let invalid = |error| BodyError::Invalid { error, line };
        if let Some((inputs, outputs)) = self.expect.shape {
            // What a row held beyond the stream's shape was counted, not kept.
            for (field, v, want) in [("y", &row.y, outputs), ("x", &row.x, inputs)] {
                if v.count != want {
                    return Err(invalid(BatchError::Dimension {
                        index,
                        field,
                        expected: want,
                        got: v.count,
                    }));
                }
            }
        }
        let o = Observation {
            seq: row.seq,
            x: row.x.kept,
            y: row.y.kept,
        };
        if let Some((inputs, outputs)) = self.expect.shape {
            o.check(index, inputs, outputs).map_err(invalid)?;
        }
        self.out.push(o);
        Ok(())
    }
}

/// One observation as read: its numbers up to what the stream takes, and how many there were.
struct Row {
    seq: Option<u64>,
    x: Values,
    y: Values,
}

#[derive(Default)]
struct Values {
    kept: Vec<f64>,
    count: usize,
}

impl Values {
    fn all(kept: Vec<f64>) -> Self {
        Values {
            count: kept.len(),
            kept,
        }
    }
}

/// How many numbers of `x` and `y` a row keeps: the stream's shape, or all.
fn caps(expect: &Expect) -> (usize, usize) {
    expect.shape.unwrap_or((usize::MAX, usize::MAX))
}

/// A number or an array of numbers (`"y": 1.5` and `"y": [1.5]` mean the same), keeping at
/// most `cap` of them; `null` is none when `nullable`.
struct ValuesSeed {
    cap: usize,
    nullable: bool,
}

impl<'de> DeserializeSeed<'de> for ValuesSeed {
    type Value = Values;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Values, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValuesSeed {
    type Value = Values;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number or an array of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Values, E> {
        let mut out = Values::default();
        out.add(v, self.cap);
        Ok(out)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Values, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Values, E> {
        self.visit_f64(v as f64)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Values, E> {
        if self.nullable {
            Ok(Values::default())
        } else {
            Err(E::invalid_type(de::Unexpected::Unit, &self))
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
        let mut out = Values {
            kept: Vec::with_capacity(seq.size_hint().unwrap_or(1).min(self.cap).min(1024)),
            count: 0,
        };
        // Every element is still read as a number, so a bad one is named wherever it is.
        while let Some(v) = seq.next_element::<f64>()? {
            out.add(v, self.cap);
        }
        Ok(out)
    }
}

impl Values {
    fn add(&mut self, v: f64, cap: usize) {
        if self.count < cap {
            self.kept.push(v);
        }
        self.count += 1;
    }
}

/// Reads one key of `fields` as its index.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "one of {:?}", self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        self.0
            .iter()
            .position(|f| *f == v)
            .ok_or_else(|| E::unknown_field(v, self.0))
    }
}

/// Sets a field read once, refusing it the second time.
fn once<T, E: de::Error>(slot: &mut Option<T>, name: &'static str, v: T) -> Result<(), E> {
    if slot.replace(v).is_some() {
        return Err(E::duplicate_field(name));
    }
    Ok(())
}

/// One observation object: `y`, optional `x` and `seq`, nothing else.
struct RowSeed {
    /// Numbers kept of `x` and `y`.
    caps: (usize, usize),
}

const ROW_FIELDS: &[&str] = &["seq", "x", "y"];

impl<'de> DeserializeSeed<'de> for RowSeed {
    type Value = Row;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Row, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed {
    type Value = Row;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an observation object with `y` and optional `x` and `seq`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let (mut seq, mut x, mut y) = (None, None, None);
        while let Some(key) = map.next_key_seed(KeySeed(ROW_FIELDS))? {
            match key {
                0 => once(&mut seq, "seq", map.next_value::<Option<u64>>()?)?,
                1 => {
                    let seed = ValuesSeed {
                        cap: self.caps.0,
                        nullable: true,
                    };
                    once(&mut x, "x", map.next_value_seed(seed)?)?
                }
                _ => {
                    let seed = ValuesSeed {
                        cap: self.caps.1,
                        nullable: false,
                    };
                    once(&mut y, "y", map.next_value_seed(seed)?)?
                }
            }
        }
        Ok(Row {
            seq: seq.flatten(),
            x: x.unwrap_or_default(),
            y: y.ok_or_else(|| de::Error::missing_field("y"))?,
        })
    }
}

/// A JSON array of observation objects, each checked into the sink as it is read; a refusal
/// is left in `refused` (serde's error type cannot carry it).
struct BatchSeed<'a, 'b> {
    sink: &'a mut Sink<'b>,
    refused: &'a mut Option<BodyError>,
}

impl<'de> DeserializeSeed<'de> for BatchSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of observation objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let caps = caps(self.sink.expect);
        loop {
            let pushed = match self.sink.room() {
                // One past the limit is refused before it is read.
                Err(e) => match another(&mut seq)? {
                    false => return Ok(()),
                    true => Err(e),
                },
                Ok(()) => match seq.next_element_seed(RowSeed { caps })? {
                    None => return Ok(()),
                    Some(row) => self.sink.push(row, None),
                },
            };
            if let Err(e) = pushed {
                *self.refused = Some(e);
                return Err(de::Error::custom("refused"));
            }
        }
    }
}

/// Whether a sequence has another element, without reading it.
fn another<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<bool, A::Error> {
    let mut reached = false;
    match seq.next_element_seed(Unread(&mut reached)) {
        Ok(next) => Ok(next.is_some()),
        Err(_) if reached => Ok(true),
        Err(e) => Err(e),
    }
}

/// A seed that notes it was reached and reads nothing.
struct Unread<'a>(&'a mut bool);

impl<'de> DeserializeSeed<'de> for Unread<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        *self.0 = true;
        Err(de::Error::custom("not read"))
    }
}

/// The field a serde_json message names (`unknown field `z``, `missing field `y``).
pub(crate) fn field_of(msg: &str) -> Option<String> {
    if !(msg.starts_with("unknown field")
        || msg.starts_with("missing field")
        || msg.starts_with("duplicate field"))
    {
        return None;
    }
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_owned())
}

/// Decodes JSON, naming the path of whatever failed (`[3].y`, `step.eps`).
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    from_json_seed(bytes, PhantomData::<T>)
}

/// [`from_json`] through a seed.
fn from_json_seed<'de, S: DeserializeSeed<'de>>(
    bytes: &'de [u8],
    seed: S,
) -> Result<S::Value, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut track = serde_path_to_error::Track::new();
    let result = seed.deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track));
    let value = result.map_err(|inner: serde_json::Error| {
        let path = track.path().to_string();
        let msg = inner.to_string();
        let named = field_of(&msg);
        // The path ends at an unknown field, but stops at the parent of a missing one.
        let field = match (path.as_str(), named) {
            ("." | "", f) => f,
            (p, Some(f)) if !p.ends_with(f.as_str()) => Some(format!("{p}.{f}")),
            (p, _) => Some(p.to_owned()),
        };
        DecodeError {
            detail: format!("malformed JSON: {msg}"),
            line: (inner.line() > 0).then_some(inner.line() as u64),
            field,
        }
    })?;
    de.end()
        .map_err(|e| DecodeError::new(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// What the unchecked decoders return: only a malformed body can be refused by them.
fn unchecked(r: Result<Vec<Observation>, BodyError>) -> Result<Vec<Observation>, DecodeError> {
    r.map_err(|e| match e {
        BodyError::Malformed(d) => d,
        other => DecodeError::new(other.to_string()),
    })
}

/// `application/json`: one object or an array of objects, of any shape.
pub fn decode_json(body: &[u8]) -> Result<Vec<Observation>, DecodeError> {
    unchecked(decode(Format::Json, body, &Expect::ANY))
}

/// `application/x-ndjson`: one object per line, of any shape; blank lines are skipped.
pub fn decode_ndjson(body: &[u8]) -> Result<Vec<Observation>, DecodeError> {
    unchecked(decode(Format::Ndjson, body, &Expect::ANY))
}

/// `text/csv` ([`Format::Csv`]), of any shape.
pub fn decode_csv(body: &[u8]) -> Result<Vec<Observation>, DecodeError> {
    unchecked(decode(Format::Csv, body, &Expect::ANY))
}

fn json(body: &[u8], sink: &mut Sink) -> Result<(), BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(DecodeError::new("empty body: expected a JSON object or array").into()),
        Some(b'[') => {
            let mut refused = None;
            let seed = BatchSeed {
                sink,
                refused: &mut refused,
            };
            let decoded = from_json_seed(body, seed);
            match refused {
                Some(e) => Err(e),
                None => Ok(decoded?),
            }
        }
        Some(b'{') => {
            let caps = caps(sink.expect);
            let row = from_json_seed(body, RowSeed { caps })?;
            sink.push(row, None)
        }
        Some(_) => Err(DecodeError::new("expected a JSON object or an array of objects").into()),
    }
}

fn ndjson(body: &[u8], sink: &mut Sink) -> Result<(), BodyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError::new(format!("body is not UTF-8: {e}")))?;
    let caps = caps(sink.expect);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i as u64 + 1;
        sink.room()?;
        let row = from_json_seed(line.as_bytes(), RowSeed { caps }).map_err(|mut d| {
            d.detail = format!("line {n}: {}", d.detail);
            d.at_line(n)
        })?;
        sink.push(row, Some(n))?;
    }
    if sink.out.is_empty() {
        return Err(DecodeError::new("empty body: expected one JSON object per line").into());
    }
    Ok(())
}

/// Which CSV column feeds what.
enum Column {
    Seq,
    Y(usize),
    X(usize),
}

/// Parses `y`, `y1`, `y2`, … (and likewise `x…`) into a 0-based index.
fn indexed(name: &str, prefix: char) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() {
        return Some(0);
    }
    rest.parse::<usize>()
        .ok()
        .filter(|&n| n >= 1)
        .map(|n| n - 1)
}

fn csv(body: &[u8], sink: &mut Sink) -> Result<(), BodyError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| DecodeError::new(format!("malformed CSV header: {e}")).at_line(1))?
        .clone();
    let mut columns = Vec::with_capacity(headers.len());
    let (mut ny, mut nx) = (0usize, 0usize);
    for h in headers.iter() {
        let c = if h == "seq" {
            Column::Seq
        } else if let Some(i) = indexed(h, 'y') {
            ny = ny.max(i + 1);
            Column::Y(i)
        } else if let Some(i) = indexed(h, 'x') {
            nx = nx.max(i + 1);
            Column::X(i)
        } else {
            return Err(DecodeError::new(format!(
                "unknown column `{h}`: expected `seq`, `y` or `y1..`, `x` or `x1..`"
            ))
            .at_line(1)
            .field(h)
            .into());
        };
        columns.push(c);
    }
    if ny == 0 {
        return Err(DecodeError::new("the header has no `y` column")
            .at_line(1)
            .field("y")
            .into());
    }
    // Indices must run 1..=k without gaps or repeats (and so are bounded by the header's
    // length: a header `y999999999` must not size anything).
    for (prefix, n) in [('y', ny), ('x', nx)] {
        let mut seen = vec![false; n.min(headers.len())];
        for (c, h) in columns.iter().zip(headers.iter()) {
            let i = match (c, prefix) {
                (Column::Y(i), 'y') | (Column::X(i), 'x') => *i,
                _ => continue,
            };
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(DecodeError::new(format!(
                        "column `{h}` repeats or skips an index: `{prefix}` columns must be `{prefix}` or `{prefix}1`..`{prefix}k`"
                    ))
                    .at_line(1)
                    .field(h)
                    .into());
                }
            }
        }
        if seen.len() < n || seen.iter().any(|s| !s) {
            return Err(DecodeError::new(format!(
                "the `{prefix}` columns skip an index: they must be `{prefix}` or `{prefix}1`..`{prefix}k`"
            ))
            .at_line(1)
            .field(prefix.to_string())
            .into());
        }
    }
    let mut rec = csv::StringRecord::new();
    for i in 0u64.. {
        let line = i + 2;
        let more = reader.read_record(&mut rec).map_err(|e| {
            DecodeError::new(format!("line {line}: malformed CSV: {e}")).at_line(line)
        })?;
        if !more {
            break;
        }
        sink.room()?;
        let (mut seq, mut x, mut y) = (None, vec![f64::NAN; nx], vec![f64::NAN; ny]);
        for (cell, (col, name)) in rec.iter().zip(columns.iter().zip(headers.iter())) {
            let bad = |what: &str| {
                DecodeError::new(format!(
                    "line {line}, column `{name}`: `{cell}` is not {what}"
                ))
                .at_line(line)
                .field(name)
            };
            match col {
                Column::Seq if cell.is_empty() => {}
                Column::Seq => seq = Some(cell.parse().map_err(|_| bad("a sequence number"))?),
                Column::Y(k) => y[*k] = cell.parse().map_err(|_| bad("a number"))?,
                Column::X(k) => x[*k] = cell.parse().map_err(|_| bad("a number"))?,
            }
        }
        let row = Row {
            seq,
            x: Values::all(x),
            y: Values::all(y),
        };
        sink.push(row, Some(line))?;
    }
    if sink.out.is_empty() {
        return Err(DecodeError::new("the CSV has a header but no rows").into());
    }
    Ok(())
}

/// A forecast request: `horizon` steps, an optional `level`, and the future inputs `x` as
/// `horizon` rows of the stream's inputs, flattened (empty for a stream without inputs).
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastBody {
    pub horizon: usize,
    pub level: Option<Vec<f64>>,
    pub x: Vec<f64>,
}

/// `level`: one number or an array of them.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Levels {
    One(f64),
    Many(Vec<f64>),
}

impl From<Levels> for Vec<f64> {
    fn from(l: Levels) -> Self {
        match l {
            Levels::One(v) => vec![v],
            Levels::Many(v) => v,
        }
    }
}

/// Decodes a forecast request for a stream of `inputs` exogenous inputs and a daemon whose
/// longest horizon is `max_horizon`: a row of `x` the forecast cannot use (any, without inputs;
/// beyond the horizon, or the longest one while the horizon is not yet read) is refused as it
/// comes, and a row's numbers beyond `inputs` are counted, not kept.
pub fn decode_forecast(
    body: &[u8],
    inputs: usize,
    max_horizon: usize,
) -> Result<ForecastBody, BodyError> {
    let mut refused = None;
    let seed = ForecastSeed {
        inputs,
        max_horizon,
        refused: &mut refused,
    };
    let decoded = from_json_seed(body, seed);
    if let Some(e) = refused {
        return Err(e);
    }
    let req = decoded?;
    let want = if inputs == 0 { 0 } else { req.horizon };
    let rows = req.x.len() / inputs.max(1);
    if rows != want {
        return Err(BodyError::Inputs {
            field: "x".into(),
            detail: format!(
                "`x` must hold {want} rows (one per step) of {inputs} inputs, got {rows} rows"
            ),
        });
    }
    Ok(req)
}

const FORECAST_FIELDS: &[&str] = &["horizon", "level", "x"];

struct ForecastSeed<'a> {
    inputs: usize,
    max_horizon: usize,
    refused: &'a mut Option<BodyError>,
}

impl<'de> DeserializeSeed<'de> for ForecastSeed<'_> {
    type Value = ForecastBody;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ForecastBody, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ForecastSeed<'_> {
    type Value = ForecastBody;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a forecast request object with `horizon` and optional `level` and `x`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ForecastBody, A::Error> {
        let (mut horizon, mut level, mut x) = (None, None, None);
        while let Some(key) = map.next_key_seed(KeySeed(FORECAST_FIELDS))? {
            match key {
                0 => once(&mut horizon, "horizon", map.next_value::<usize>()?)?,
                1 => once(
                    &mut level,
                    "level",
                    map.next_value::<Option<Levels>>()?.map(Vec::from),
                )?,
                _ => {
                    let mut flat = Vec::new();
                    let seed = RowsSeed {
                        inputs: self.inputs,
                        max_horizon: self.max_horizon,
                        horizon,
                        out: &mut flat,
                        refused: &mut *self.refused,
                    };
                    map.next_value_seed(seed)?;
                    once(&mut x, "x", flat)?
                }
            }
        }
        Ok(ForecastBody {
            horizon: horizon.ok_or_else(|| de::Error::missing_field("horizon"))?,
            level: level.flatten(),
            x: x.unwrap_or_default(),
        })
    }
}

/// The rows of a forecast's `x`, appended flat to `out`; the first row the forecast cannot use,
/// or a row of the wrong length, is refused into `refused`.
struct RowsSeed<'a> {
    inputs: usize,
    max_horizon: usize,
    /// The horizon, when it came before `x`.
    horizon: Option<usize>,
    out: &'a mut Vec<f64>,
    refused: &'a mut Option<BodyError>,
}

impl<'de> DeserializeSeed<'de> for RowsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of rows of numbers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inputs = self.inputs;
        let rows = match self.horizon {
            _ if inputs == 0 => 0,
            Some(h) => h.min(self.max_horizon),
            None => self.max_horizon,
        };
        let mut row = 0;
        loop {
            let seed = RowSeedX {
                inputs,
                out: &mut *self.out,
            };
            // A row past those allowed is refused before it is read.
            let refusal = if row >= rows {
                match another(&mut seq)? {
                    false => return Ok(()),
                    true => too_many_rows(inputs, self.horizon, self.max_horizon),
                }
            } else {
                match seq.next_element_seed(seed)? {
                    None => return Ok(()),
                    Some(n) if n == inputs => {
                        row += 1;
                        continue;
                    }
                    Some(n) => BodyError::Inputs {
                        field: format!("x[{row}]"),
                        detail: format!(
                            "`x[{row}]` has {n} values, the stream has {inputs} inputs"
                        ),
                    },
                }
            };
            *self.refused = Some(refusal);
            return Err(de::Error::custom("refused"));
        }
    }
}

fn too_many_rows(inputs: usize, horizon: Option<usize>, max: usize) -> BodyError {
    let (field, detail) = match horizon {
        _ if inputs == 0 => (
            "x",
            "the stream has no exogenous inputs: leave `x` out".to_owned(),
        ),
        Some(h) if h > max => (
            "horizon",
            format!("`horizon` must be between 1 and {max}, got {h}"),
        ),
        Some(h) => (
            "x",
            format!("`x` must hold {h} rows (one per step) of {inputs} inputs, got more"),
        ),
        None => (
            "x",
            format!("`x` holds more rows than the longest horizon, {max}"),
        ),
    };
    BodyError::Inputs {
        field: field.into(),
        detail,
    }
}

/// One row of a forecast's `x`: its first `inputs` numbers appended to `out`; returns how many
/// there were.
struct RowSeedX<'a> {
    inputs: usize,
    out: &'a mut Vec<f64>,
}

impl<'de> DeserializeSeed<'de> for RowSeedX<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowSeedX<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of numbers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        // JSON numbers are finite (serde_json refuses `1e400`), so every kept one is usable.
        while let Some(v) = seq.next_element::<f64>()? {
            if n < self.inputs {
                self.out.push(v);
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_array_and_scalar_or_vector_values() {
        let one = decode_json(br#"{"y": 12.5}"#).unwrap();
        assert_eq!(
            one,
            vec![Observation {
                seq: None,
                x: vec![],
                y: vec![12.5]
            }]
        );
        let many = decode_json(br#"[{"y": [1, 2], "x": [3], "seq": 4}, {"y": 5}]"#).unwrap();
        assert_eq!(
            many[0],
            Observation {
                seq: Some(4),
                x: vec![3.0],
                y: vec![1.0, 2.0]
            }
        );
        assert_eq!(many[1].y, vec![5.0]);
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = decode_json(br#"{"y": 1, "z": 2}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("z"));
        let e = decode_json(br#"{"x": [1]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("y"));
        let e = decode_json(br#"[{"y": 1}, {"y": [1, "a"]}]"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("[1].y[1]"));
        let e = decode_json(br#"[{"y": 1}, {"x": [1]}]"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("[1].y"));
        assert!(decode_json(br#"{"y": 1e400}"#).is_err());
        assert!(decode_json(br#"{"y": "a"}"#).is_err());
        assert!(decode_json(b"").is_err());
        assert!(decode_json(b"42").is_err());
    }

    #[test]
    fn ndjson_reports_the_line() {
        let ok = decode_ndjson(b"{\"y\": 1}\n\n{\"y\": 2}\n").unwrap();
        assert_eq!(ok.len(), 2);
        let e = decode_ndjson(b"{\"y\": 1}\n{\"y\": }\n").unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn csv_columns_and_errors() {
        let ok = decode_csv(b"seq,y1,y2,x\n1,1.5,2.5,0.1\n,3,4,0.2\n").unwrap();
        assert_eq!(
            ok[0],
            Observation {
                seq: Some(1),
                x: vec![0.1],
                y: vec![1.5, 2.5]
            }
        );
        assert_eq!(ok[1].seq, None);
        let e = decode_csv(b"y\n1\nabc\n").unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("y")));
        let e = decode_csv(b"date,y\n2020,1\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("date"));
        assert!(decode_csv(b"x\n1\n").is_err());
        for bad in [
            "y,y1\n1,2\n",
            "y2\n1\n",
            "y1,y3\n1,2\n",
            "y1,x2\n1,2\n",
            "y,y\n1,2\n",
        ] {
            assert!(decode_csv(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(decode_csv(b"y\n").is_err());
    }

    /// Found by `cargo fuzz`: a header index sized a vector (`y121599999999999999`).
    #[test]
    fn csv_column_index_beyond_the_header_is_refused_issue_5() {
        let e = decode_csv(b"\ny121599999999999999\n\x0b\0\0\0\0\0\0\0").unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = decode_csv(b"y1000000000000\n1\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("y1000000000000"));
    }

    fn expect(inputs: usize, outputs: usize, max: usize) -> Expect {
        Expect {
            shape: Some((inputs, outputs)),
            max_observations: max,
        }
    }

    #[test]
    fn checked_decoding_refuses_at_the_first_row_past_the_limit_or_out_of_shape() {
        let e = expect(0, 1, 2);
        for (format, body) in [
            (Format::Json, &b"[{\"y\": 1}, {\"y\": 2}, {\"y\": 3}]"[..]),
            (Format::Ndjson, b"{\"y\": 1}\n{\"y\": 2}\n{\"y\": 3}\n"),
            (Format::Csv, b"y\n1\n2\n3\n"),
        ] {
            assert_eq!(
                decode(format, body, &e),
                Err(BodyError::TooMany { limit: 2 }),
                "{format:?}"
            );
        }
        // Exactly the limit is fine, and so is the array's end right after it.
        assert_eq!(
            decode(Format::Json, b"[{\"y\": 1}, {\"y\": 2}]", &e)
                .unwrap()
                .len(),
            2
        );
        // Past the limit even when what follows is malformed: it is not read.
        assert_eq!(
            decode(Format::Json, b"[{\"y\": 1}, {\"y\": 2}, nonsense", &e),
            Err(BodyError::TooMany { limit: 2 })
        );
        let dimension = |index, field, expected, got, line| BodyError::Invalid {
            error: BatchError::Dimension {
                index,
                field,
                expected,
                got,
            },
            line,
        };
        assert_eq!(
            decode(Format::Ndjson, b"{\"y\": 1}\n\n{\"y\": [1, 2, 3]}\n", &e),
            Err(dimension(1, "y", 1, 3, Some(3)))
        );
        assert_eq!(
            decode(Format::Json, b"[{\"y\": 1}, {\"y\": 1, \"x\": [1, 2]}]", &e),
            Err(dimension(1, "x", 0, 2, None))
        );
        assert_eq!(
            decode(Format::Csv, b"y,x\n1,2\n", &e),
            Err(dimension(0, "x", 0, 1, Some(2)))
        );
        let e = expect(1, 1, 10);
        assert_eq!(
            decode(Format::Json, b"{\"y\": 1}", &e),
            Err(dimension(0, "x", 1, 0, None))
        );
        assert!(matches!(
            decode(Format::Csv, b"y,x\n1,2\n1,NaN\n", &e),
            Err(BodyError::Invalid {
                error: BatchError::NotFinite { index: 1, .. },
                line: Some(3)
            })
        ));
        assert!(matches!(
            decode(Format::Json, b"{\"seq\": 0, \"y\": 1, \"x\": 1}", &e),
            Err(BodyError::Invalid {
                error: BatchError::SeqZero { index: 0 },
                ..
            })
        ));
        // A number past the shape is still read as a number: a bad one is named where it is.
        let Err(BodyError::Malformed(d)) =
            decode(Format::Json, b"[{\"y\": [1, 2, \"a\"], \"x\": 1}]", &e)
        else {
            panic!("malformed")
        };
        assert_eq!(d.field.as_deref(), Some("[0].y[2]"));
    }

    #[test]
    fn forecast_inputs_are_refused_as_they_come() {
        let ok = decode_forecast(
            br#"{"horizon": 2, "level": 0.8, "x": [[1, 2], [3, 4]]}"#,
            2,
            10,
        )
        .unwrap();
        assert_eq!(
            ok,
            ForecastBody {
                horizon: 2,
                level: Some(vec![0.8]),
                x: vec![1.0, 2.0, 3.0, 4.0]
            }
        );
        let ok = decode_forecast(br#"{"x": [], "horizon": 3}"#, 0, 10).unwrap();
        assert_eq!((ok.horizon, ok.level, ok.x.len()), (3, None, 0));
        let field = |body: &[u8], inputs, max| match decode_forecast(body, inputs, max) {
            Err(BodyError::Inputs { field, .. }) => field,
            Err(BodyError::Malformed(d)) => format!("malformed {:?}", d.field),
            other => panic!("{other:?}"),
        };
        // Rows a forecast cannot use are refused before they are read, so what follows them
        // does not matter.
        assert_eq!(field(br#"{"horizon": 1, "x": [[1], nonsense"#, 0, 10), "x");
        assert_eq!(field(br#"{"horizon": 1, "x": [[1], nonsense"#, 1, 10), "x");
        assert_eq!(field(br#"{"x": [[1], [1], [1], nonsense"#, 1, 2), "x");
        assert_eq!(
            field(br#"{"horizon": 5, "x": [[1], [1], [1]"#, 1, 2),
            "horizon"
        );
        assert_eq!(
            field(br#"{"horizon": 2, "x": [[1], [1, 2]]}"#, 1, 10),
            "x[1]"
        );
        assert_eq!(field(br#"{"horizon": 2, "x": [[1]]}"#, 1, 10), "x");
        assert_eq!(field(br#"{"horizon": 2}"#, 1, 10), "x");
        assert_eq!(
            field(br#"{"x": [[1]]}"#, 1, 10),
            r#"malformed Some("horizon")"#
        );
        assert_eq!(
            field(br#"{"horizon": 1, "y": 1}"#, 0, 10),
            r#"malformed Some("y")"#
        );
        assert_eq!(
            field(br#"{"horizon": 1, "horizon": 1}"#, 0, 10),
            r#"malformed Some("horizon")"#
        );
    }

    #[test]
    fn the_charge_bounds_what_decoding_holds() {
        // A row per two bytes at most, and numbers per row as the stream takes.
        let row = observations_bound(1000, usize::MAX, 0);
        assert_eq!(observations_bound(1000, 10, 0), row / 501 * 10);
        assert!(observations_bound(16 << 20, 100_000, 3) < 64 << 20);
        assert_eq!(forecast_bound(1000, 10, 0), 0);
        assert_eq!(forecast_bound(1000, 10, 3), 10 * 3 * 8);
        assert_eq!(forecast_bound(10, 1000, 3), 6 * 8);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn observation(m: usize, n: usize) -> impl Strategy<Value = Observation> {
            (
                proptest::option::of(1u64..1_000_000),
                proptest::collection::vec(-1e12f64..1e12, n),
                proptest::collection::vec(-1e12f64..1e12, m),
            )
                .prop_map(|(seq, x, y)| Observation { seq, x, y })
        }

        fn batch() -> impl Strategy<Value = Vec<Observation>> {
            (1usize..4, 0usize..3)
                .prop_flat_map(|(m, n)| proptest::collection::vec(observation(m, n), 1..20))
        }

        fn json(o: &Observation) -> String {
            serde_json::json!({"seq": o.seq, "x": o.x, "y": o.y}).to_string()
        }

        fn csv(b: &[Observation]) -> String {
            let (m, n) = (b[0].y.len(), b[0].x.len());
            let mut head = vec!["seq".to_owned()];
            head.extend((1..=m).map(|i| format!("y{i}")));
            head.extend((1..=n).map(|i| format!("x{i}")));
            let mut out = head.join(",") + "\n";
            for o in b {
                let mut row = vec![o.seq.map_or(String::new(), |s| s.to_string())];
                row.extend(o.y.iter().map(f64::to_string));
                row.extend(o.x.iter().map(f64::to_string));
                out += &(row.join(",") + "\n");
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode_json(&bytes);
                let _ = decode_ndjson(&bytes);
                let _ = decode_csv(&bytes);
            }

            #[test]
            fn valid_batches_round_trip_in_every_format(b in batch()) {
                let array = format!("[{}]", b.iter().map(json).collect::<Vec<_>>().join(","));
                prop_assert_eq!(&decode_json(array.as_bytes()).unwrap(), &b);
                let nd: String = b.iter().map(|o| json(o) + "\n").collect();
                prop_assert_eq!(&decode_ndjson(nd.as_bytes()).unwrap(), &b);
                prop_assert_eq!(&decode_csv(csv(&b).as_bytes()).unwrap(), &b);
            }

            #[test]
            fn checked_decoding_of_valid_batches_agrees_with_unchecked(b in batch()) {
                let (m, n) = (b[0].y.len(), b[0].x.len());
                let nd: String = b.iter().map(|o| json(o) + "\n").collect();
                for (format, body) in [(Format::Ndjson, nd), (Format::Csv, csv(&b))] {
                    let e = expect(n, m, b.len());
                    prop_assert_eq!(&decode(format, body.as_bytes(), &e).unwrap(), &b);
                    let fewer = expect(n, m, b.len() - 1);
                    prop_assert_eq!(
                        decode(format, body.as_bytes(), &fewer),
                        Err(BodyError::TooMany { limit: b.len() - 1 })
                    );
                }
            }

            #[test]
            fn mutated_valid_bodies_never_panic(b in batch(), cuts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
                for text in [format!("[{}]", b.iter().map(json).collect::<Vec<_>>().join(",")), csv(&b)] {
                    let mut bytes = text.into_bytes();
                    for (at, v) in &cuts {
                        if bytes.is_empty() { break; }
                        let i = at % bytes.len();
                        if v % 3 == 0 { bytes.remove(i); } else { bytes[i] = *v; }
                    }
                    let _ = decode_json(&bytes);
                    let _ = decode_ndjson(&bytes);
                    let _ = decode_csv(&bytes);
                }
            }
        }
    }
}
