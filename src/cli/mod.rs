//! The command line: raw flags parsed by clap, turned into validated settings, and the one place
//! where errors are printed and turned into an exit code.

use std::io::Write;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;

use crate::server::Config;

use crate::engine::Scaler;
use crate::engine::{Options, ScaleOption};
use crate::eval::{self, EvalConfig, EvalMethod, OgdSettings};

use crate::server;
mod flags;
mod replay;

pub use flags::{
    Cli, Command, DEFAULT_PASSES, EvalArgs, InspectArgs, OptionFlags, ReplayArgs, ServeArgs,
};

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
    let reports = crate::storage::inspect(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", crate::storage::render(&reports));
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
    if let Some(urls) = args.cluster {
        config.cluster.urls = urls;
    }
    if let Some(n) = args.node {
        config.cluster.node = n;
    }
    if let Some(a) = args.advertise {
        config.cluster.advertise = a;
    }
    config.cluster.check()?;
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
    let series = eval::read_series(&args.file, args.column.as_deref())
        .with_context(|| format!("reading {}", args.file.display()))?;
    let config = eval_config(&args, options)?;
    let scaler = match config.options.scale {
        ScaleOption::Fixed(r) => Scaler::new(r.min, r.max),
        ScaleOption::Auto(_) => Scaler::fit(&series.values),
    };
    let scaled: Vec<f64> = series.values.iter().map(|&v| scaler.to_model(v)).collect();

    // The EKI run whose predictions are written: `eki` if chosen, else the first EKI method.
    let written = config
        .methods
        .iter()
        .position(|m| matches!(m, EvalMethod::Eki(n, _) if n == "eki"))
        .or_else(|| {
            config
                .methods
                .iter()
                .position(|m| matches!(m, EvalMethod::Eki(..)))
        });
    let keep = (args.predictions.is_some() || args.plot.is_some())
        .then_some(written)
        .flatten();
    let mut results = Vec::new();
    let mut preds: Vec<Option<f64>> = Vec::new();
    for (i, m) in config.methods.iter().enumerate() {
        let r = eval::run_method(m, &config, &scaled, |_, p| {
            if keep == Some(i) {
                preds.push(p);
            }
        });
        results.push(r);
    }
    let user: Vec<Option<f64>> = preds.iter().map(|p| p.map(|p| scaler.to_user(p))).collect();
    if let Some(path) = &args.predictions {
        if written.is_none() {
            bail!("--predictions needs an EKI method in --methods");
        }
        write_predictions(path, &series.values, &user)?;
    }
    let train = ((series.values.len() as f64) * config.train_fraction).round() as usize;
    if let Some(path) = &args.plot {
        if written.is_none() {
            bail!("--plot needs an EKI method in --methods");
        }
        let title = format!(
            "{} `{}`: one-step prequential predictions",
            args.file.display(),
            series.column
        );
        eval::write_svg(path, &title, &series.values, &user, train)?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = serde_json::json!({
            "dataset": args.file.display().to_string(),
            "column": series.column,
            "n": series.values.len(),
            "train": train,
            "scale": {"min": scaler.min, "max": scaler.max},
            "results": results,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(
            out,
            "{} `{}`: {} values, train {train} / test {}, {} passes, {}; nMSE on the [0,1] scale",
            args.file.display(),
            series.column,
            series.values.len(),
            series.values.len() - train,
            config.passes,
            config.options.precision.name()
        )?;
        write!(out, "{}", eval::table(&results))?;
    }
    Ok(())
}

/// The methods `--methods` names (all by default) resolved against the stream options, and the
/// protocol's settings.
fn eval_config(args: &EvalArgs, options: Options) -> anyhow::Result<EvalConfig> {
    let names: Vec<String> = match &args.methods {
        Some(m) => m.clone(),
        None => eval::METHOD_NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let methods = names
        .iter()
        .map(|n| {
            EvalMethod::parse(n.trim(), &options).with_context(|| {
                format!(
                    "unknown method `{n}`; known: {}",
                    eval::METHOD_NAMES.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !(args.level > 0.0 && args.level < 1.0) {
        anyhow::bail!("--level must be in (0, 1), got {}", args.level);
    }
    Ok(EvalConfig {
        level: args.level,
        options,
        passes: args.passes,
        methods,
        ogd: OgdSettings {
            lr: args.ogd_lr,
            window: args.ogd_window,
        },
        train_fraction: 0.8,
        step_threads: args.step_threads.max(1),
    })
}

/// `seq,y,prediction` for every row (seq is the 1-based row; no prediction while the lag
/// buffer fills), predictions in the series' units.
fn write_predictions(path: &Path, values: &[f64], user: &[Option<f64>]) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record(["seq", "y", "prediction"])?;
    for (i, (&y, p)) in values.iter().zip(user).enumerate() {
        let p = p.map_or(String::new(), |p| p.to_string());
        w.write_record([(i + 1).to_string(), y.to_string(), p])?;
    }
    w.flush()?;
    Ok(())
}
