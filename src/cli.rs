//! The command line: raw flags parsed by clap, turned into validated settings, and the one place
//! where errors are printed and turned into an exit code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::data;
use crate::eval::{self, EvalConfig, EvalMethod, OgdSettings};
use crate::model::Scaler;
use crate::options::{
    Loss, Method, Off, Options, Range, RawOptions, ScaleOption, Spread, SpreadOption, Step,
};
use crate::real::Precision;
use crate::replay::{self, ReplayArgs};
use crate::server;

#[derive(Debug, Parser)]
#[command(
    name = "ekid",
    version,
    about = "Online forecasting with EKI-trained recurrent ensembles"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run the daemon (HTTP API on --listen, state under --data-dir).
    Serve(ServeArgs),
    /// Offline evaluation (SPEC §6) of EKI variants and baselines on a CSV series.
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// Stream a CSV series into a running daemon over HTTP (resumes where the stream stands).
    #[command(allow_negative_numbers = true)]
    Replay(ReplayArgs),
    /// List a data directory's streams, snapshots and log segments, checking every checksum.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (default: built-in defaults, see config/ekid.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7878 (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for stream state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The daemon's data directory.
    pub dir: PathBuf,
    /// Print JSON instead of the listing.
    #[arg(long)]
    pub json: bool,
}

/// Every stream option as a flag; unset flags take the built-in defaults.
#[derive(Debug, Args, Default, Clone)]
pub struct OptionFlags {
    /// Hidden units of the Elman cell.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Past values fed to the cell.
    #[arg(long)]
    pub lags: Option<usize>,
    /// Exogenous inputs (eval reads one column, so 0).
    #[arg(long)]
    pub inputs: Option<usize>,
    /// Outputs (eval reads one column, so 1).
    #[arg(long)]
    pub outputs: Option<usize>,
    /// Ensemble size J.
    #[arg(long)]
    pub ensemble: Option<usize>,
    /// Update form.
    #[arg(long, value_parser = ["kalman", "flow"])]
    pub method: Option<String>,
    /// Observation noise Γ = noise·I, scaled units.
    #[arg(long)]
    pub noise: Option<f64>,
    /// Flow step h.
    #[arg(long)]
    pub step_h: Option<f64>,
    /// Flow step ε.
    #[arg(long)]
    pub step_eps: Option<f64>,
    /// Loss Ψ of the flow form.
    #[arg(long, value_parser = ["squared", "absolute", "huber"])]
    pub loss: Option<String>,
    /// Huber threshold (scaled units).
    #[arg(long)]
    pub huber_delta: Option<f64>,
    /// Nesterov momentum on the flow.
    #[arg(long)]
    pub momentum: Option<bool>,
    /// Steps between restarts of the Nesterov coefficient.
    #[arg(long)]
    pub momentum_restart: Option<u64>,
    /// `off` or `EVERY:GAMMA[:DECAY]` (EKI(R) re-spreading).
    #[arg(long)]
    pub spread: Option<String>,
    /// Multiplicative covariance inflation (1 = off).
    #[arg(long)]
    pub inflation: Option<f64>,
    /// Prior spread around its centre, as a fraction of the Glorot scale.
    #[arg(long)]
    pub prior_spread: Option<f64>,
    /// Prior spread of the read-out (centred at zero), as a fraction of the Glorot scale.
    #[arg(long)]
    pub readout_spread: Option<f64>,
    /// Linear skip from the cell inputs to the read-out.
    #[arg(long)]
    pub skip: Option<bool>,
    /// Seed of the prior draws.
    #[arg(long)]
    pub seed: Option<u64>,
    /// What the ensemble stores and computes in: `f64` or `f32`.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// `auto` or `MIN:MAX`.
    #[arg(long)]
    pub scale: Option<String>,
}

impl OptionFlags {
    pub fn to_raw(&self, defaults: &Options) -> anyhow::Result<RawOptions> {
        let method = match self.method.as_deref() {
            None => None,
            Some("flow") => Some(Method::Flow),
            Some(_) => Some(Method::Kalman),
        };
        let loss = match self.loss.as_deref() {
            None => None,
            Some("absolute") => Some(Loss::Absolute),
            Some("huber") => Some(Loss::Huber),
            Some(_) => Some(Loss::Squared),
        };
        let step = match (self.step_h, self.step_eps) {
            (None, None) => None,
            (h, eps) => Some(Step {
                h: h.unwrap_or(defaults.step.h),
                eps: eps.unwrap_or(defaults.step.eps),
            }),
        };
        let spread = match self.spread.as_deref() {
            None => None,
            Some("off") => Some(SpreadOption::Off(Off::Off)),
            Some(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                if !(2..=3).contains(&parts.len()) {
                    bail!("--spread: expected `off` or EVERY:GAMMA[:DECAY], got `{s}`");
                }
                Some(SpreadOption::On(Spread {
                    every: parts[0].parse().context("--spread EVERY")?,
                    gamma: parts[1].parse().context("--spread GAMMA")?,
                    decay: parts
                        .get(2)
                        .map_or(Ok(1.0), |d| d.parse())
                        .context("--spread DECAY")?,
                }))
            }
        };
        let scale = match self.scale.as_deref() {
            None => None,
            Some("auto") => Some(ScaleOption::Auto(crate::options::Auto::Auto)),
            Some(s) => {
                let (a, b) = s
                    .split_once(':')
                    .with_context(|| format!("--scale: expected `auto` or MIN:MAX, got `{s}`"))?;
                Some(ScaleOption::Fixed(Range {
                    min: a.parse().context("--scale MIN")?,
                    max: b.parse().context("--scale MAX")?,
                }))
            }
        };
        Ok(RawOptions {
            cell: None,
            hidden: self.hidden,
            lags: self.lags,
            inputs: self.inputs,
            outputs: self.outputs,
            ensemble: self.ensemble,
            method,
            noise: self.noise,
            step,
            loss,
            huber_delta: self.huber_delta,
            momentum: self.momentum,
            momentum_restart: self.momentum_restart,
            spread,
            inflation: self.inflation,
            prior_spread: self.prior_spread,
            readout_spread: self.readout_spread,
            skip: self.skip,
            seed: self.seed,
            scale,
            precision: self.precision,
        })
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// CSV file: a header row, a date column and numeric columns.
    pub file: PathBuf,
    /// Value column (default: the last numeric column).
    #[arg(long)]
    pub column: Option<String>,
    /// Comma-separated methods: persistence, ogd, eki, eki-flow, eki-momentum, eki-spread,
    /// eki-inflation (default: all).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Passes over the training part (`final` is after the last), at least 1.
    #[arg(long, default_value_t = DEFAULT_PASSES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub passes: usize,
    #[command(flatten)]
    pub options: OptionFlags,
    /// OGD learning rate.
    #[arg(long, default_value_t = OgdSettings::default().lr)]
    pub ogd_lr: f64,
    /// OGD truncated back-propagation window.
    #[arg(long, default_value_t = OgdSettings::default().window)]
    pub ogd_window: usize,
    /// Threads one EKI step may use: 2 splits ensembles of at least 2^20 particle-parameters
    /// (2^22 with `--precision f32`) over two cores (same results).
    #[arg(long, default_value_t = 2)]
    pub step_threads: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the prequential predictions of the default (or only) EKI method as seq,y,prediction.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Plot the series and those predictions (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Passes over the training stream when `--passes` is not given.
pub const DEFAULT_PASSES: usize = 10;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Eval(args) => run_eval(args),
        Command::Replay(args) => replay::run(args),
        Command::Inspect(args) => run_inspect(args),
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let reports = crate::inspect::inspect(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", crate::inspect::render(&reports));
    }
    if reports.iter().all(|r| r.ok()) {
        Ok(())
    } else {
        bail!("problems found (see above)")
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let data_dir = config.data_dir.clone();
        // Once recovery is done, the first line on stdout is the bound address (tests and
        // scripts wait for it).
        let ready = move || {
            println!("listening on http://{addr}");
            let _ = std::io::stdout().flush();
            tracing::info!(%addr, data_dir = %data_dir.display(), "ekid serving");
        };
        server::serve(listener, config, ready, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let defaults = Options::default();
    let options = args.options.to_raw(&defaults)?.resolve(&defaults)?;
    if options.inputs != 0 || options.outputs != 1 {
        bail!("eval reads one column: --inputs must be 0 and --outputs 1");
    }
    let series = data::read_series(&args.file, args.column.as_deref())
        .with_context(|| format!("reading {}", args.file.display()))?;
    let names: Vec<String> = match &args.methods {
        Some(m) => m.clone(),
        None => eval::METHOD_NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let mut methods = Vec::new();
    for n in &names {
        let m = EvalMethod::parse(n.trim(), &options).with_context(|| {
            format!(
                "unknown method `{n}`; known: {}",
                eval::METHOD_NAMES.join(", ")
            )
        })?;
        methods.push(m);
    }
    let config = EvalConfig {
        options: options.clone(),
        passes: args.passes,
        methods,
        ogd: OgdSettings {
            lr: args.ogd_lr,
            window: args.ogd_window,
        },
        train_fraction: 0.8,
        step_threads: args.step_threads.max(1),
    };
    let scaler = match options.scale {
        ScaleOption::Fixed(r) => Scaler::new(r.min, r.max),
        ScaleOption::Auto(_) => Scaler::fit(&series.values),
    };
    let scaled: Vec<f64> = series.values.iter().map(|&v| scaler.to_model(v)).collect();

    // The EKI run whose predictions are written: `eki` if chosen, else the first EKI method.
    let write_index = config
        .methods
        .iter()
        .position(|m| matches!(m, EvalMethod::Eki(n, _) if n == "eki"))
        .or_else(|| {
            config
                .methods
                .iter()
                .position(|m| matches!(m, EvalMethod::Eki(..)))
        });
    let mut results = Vec::new();
    let mut preds: Vec<Option<f64>> = Vec::new();
    for (i, m) in config.methods.iter().enumerate() {
        let keep = (args.predictions.is_some() || args.plot.is_some()) && Some(i) == write_index;
        let r = eval::run_method(m, &config, &scaled, |_, p| {
            if keep {
                preds.push(p);
            }
        });
        results.push(r);
    }
    if let Some(path) = &args.predictions {
        if write_index.is_none() {
            bail!("--predictions needs an EKI method in --methods");
        }
        let mut w =
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
        w.write_record(["seq", "y", "prediction"])?;
        for (i, (&y, p)) in series.values.iter().zip(&preds).enumerate() {
            let p = p.map_or(String::new(), |p| scaler.to_user(p).to_string());
            w.write_record([(i + 1).to_string(), y.to_string(), p])?;
        }
        w.flush()?;
    }
    if let Some(path) = &args.plot {
        if write_index.is_none() {
            bail!("--plot needs an EKI method in --methods");
        }
        let user: Vec<Option<f64>> = preds.iter().map(|p| p.map(|p| scaler.to_user(p))).collect();
        let split = ((series.values.len() as f64) * config.train_fraction).round() as usize;
        let title = format!(
            "{} `{}`: one-step prequential predictions",
            args.file.display(),
            series.column
        );
        crate::plot::write_svg(path, &title, &series.values, &user, split)?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = serde_json::json!({
            "dataset": args.file.display().to_string(),
            "column": series.column,
            "n": series.values.len(),
            "train": ((series.values.len() as f64) * config.train_fraction).round() as usize,
            "scale": {"min": scaler.min, "max": scaler.max},
            "results": results,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(
            out,
            "{} `{}`: {} values, train {} / test {}, {} passes, {}; nMSE on the [0,1] scale",
            args.file.display(),
            series.column,
            series.values.len(),
            ((series.values.len() as f64) * config.train_fraction).round(),
            series.values.len()
                - ((series.values.len() as f64) * config.train_fraction).round() as usize,
            config.passes,
            config.options.precision.name()
        )?;
        write!(out, "{}", eval::table(&results))?;
    }
    Ok(())
}
