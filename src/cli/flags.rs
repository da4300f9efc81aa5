//! The command line as clap parses it: raw flags, checked into the engine's options and the
//! evaluation's settings by the commands that use them.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::engine::{
    Cell, Loss, Method, Off, Options, Precision, Range, RawOptions, ScaleOption, Spread,
    SpreadOption, Step,
};
use crate::eval::OgdSettings;

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
    /// Offline evaluation (the protocol of docs/EVALUATION.md) of EKI variants and baselines on a CSV series.
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
    /// Join a cluster: the NATS JetStream servers, comma-separated (nats://HOST:PORT,...).
    #[arg(long, value_delimiter = ',')]
    pub cluster: Option<Vec<String>>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// The URL other nodes forward requests to (default: http:// + the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
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
    /// Recurrent cell.
    #[arg(long)]
    pub cell: Option<Cell>,
    /// Update form.
    #[arg(long)]
    pub method: Option<Method>,
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
    #[arg(long)]
    pub loss: Option<Loss>,
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
    /// What the ensemble stores and computes in.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// `auto` or `MIN:MAX`.
    #[arg(long)]
    pub scale: Option<String>,
    /// Forecast steps whose intervals are calibrated (and, in `eval`, scored).
    #[arg(long)]
    pub horizon: Option<usize>,
    /// Combine the ensemble's mean particle with the online autoregression and persistence.
    #[arg(long)]
    pub mixture: Option<bool>,
}

impl OptionFlags {
    pub fn to_raw(&self, defaults: &Options) -> anyhow::Result<RawOptions> {
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
            Some("auto") => Some(ScaleOption::Auto(crate::engine::Auto::Auto)),
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
            cell: self.cell,
            hidden: self.hidden,
            lags: self.lags,
            inputs: self.inputs,
            outputs: self.outputs,
            ensemble: self.ensemble,
            method: self.method,
            noise: self.noise,
            step,
            loss: self.loss,
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
            horizon: self.horizon,
            mixture: self.mixture,
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
    /// Comma-separated methods: persistence, ar, ogd, eki, eki-flow, eki-momentum, eki-spread,
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
    /// Level of the intervals scored (coverage and interval score at each step of the
    /// `--horizon`), in (0, 1).
    #[arg(long, default_value_t = 0.9)]
    pub level: f64,
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

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// CSV file: a header row, a date column and numeric columns.
    pub file: PathBuf,
    /// Base URL of the daemon.
    #[arg(long, default_value = "http://127.0.0.1:7878")]
    pub server: String,
    /// Stream name (default: the file stem, other characters than A-Z a-z 0-9 _ . - as `_`).
    #[arg(long)]
    pub stream: Option<String>,
    /// Value column (default: the last numeric column).
    #[arg(long)]
    pub column: Option<String>,
    /// Observations per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// At most this many observations per second (default: as fast as the daemon takes them).
    #[arg(long, value_name = "OBS_PER_S")]
    pub rate: Option<f64>,
    /// Bearer token sent with every request (default: the EKID_TOKEN environment variable).
    #[arg(long)]
    pub token: Option<String>,
    /// Write seq,y,prediction for every row replayed in this run (as `ekid eval --predictions`).
    #[arg(long, value_name = "OUT.csv")]
    pub predictions: Option<PathBuf>,
    /// Stream options, used when the stream is created (unset: the daemon's defaults; the scale
    /// defaults to the file's min:max).
    #[command(flatten)]
    pub options: OptionFlags,
}
