//! Stream options: the raw form users send (every field optional, unknown fields rejected) and
//! the validated form that alone can build a model.

use serde::{Deserialize, Serialize};

use crate::engine::network::Layout;
use crate::engine::real::Precision;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    Elman,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The Kalman form: `u ← u + C^{uw}(C^{ww}+Γ)^{-1}(y − w)`.
    Kalman,
    /// The discretised continuous-time flow with the adaptive step `h/(‖D‖_F+ε)`.
    Flow,
}

/// The loss Ψ of the flow form; only its gradient in the output is ever needed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    Squared,
    Absolute,
    Huber,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[schema(exclusive_minimum = 0)]
    pub h: f64,
    #[schema(exclusive_minimum = 0)]
    pub eps: f64,
}

/// EKI(R): every `every` observations the particles are re-drawn around the mean,
/// `u_j = ū + ξ_j`, `ξ ~ γ_k μ_0`, with `γ_k = gamma · decay^k` at the k-th re-draw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    #[schema(minimum = 1)]
    pub every: u64,
    #[schema(exclusive_minimum = 0)]
    pub gamma: f64,
    #[serde(default = "one")]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub decay: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Off {
    Off,
}

/// `"off"` or a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SpreadOption {
    Off(Off),
    On(Spread),
}

impl SpreadOption {
    pub fn schedule(&self) -> Option<Spread> {
        match self {
            SpreadOption::Off(_) => None,
            SpreadOption::On(s) => Some(*s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

/// `"auto"` (fixed from the first observations) or an explicit range mapped to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ScaleOption {
    Auto(Auto),
    Fixed(Range),
}

/// What a user may send: every field optional, unknown fields an error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOptions {
    pub cell: Option<Cell>,
    #[schema(minimum = 1, maximum = 1024)]
    pub hidden: Option<usize>,
    #[schema(minimum = 0, maximum = 1024)]
    pub lags: Option<usize>,
    #[schema(minimum = 0, maximum = 1024)]
    pub inputs: Option<usize>,
    #[schema(minimum = 1, maximum = 64)]
    pub outputs: Option<usize>,
    #[schema(minimum = 2, maximum = 1000000)]
    pub ensemble: Option<usize>,
    pub method: Option<Method>,
    #[schema(exclusive_minimum = 0)]
    pub noise: Option<f64>,
    pub step: Option<Step>,
    pub loss: Option<Loss>,
    #[schema(exclusive_minimum = 0)]
    pub huber_delta: Option<f64>,
    pub momentum: Option<bool>,
    #[schema(minimum = 1)]
    pub momentum_restart: Option<u64>,
    pub spread: Option<SpreadOption>,
    #[schema(minimum = 1, maximum = 10)]
    pub inflation: Option<f64>,
    #[schema(exclusive_minimum = 0)]
    pub prior_spread: Option<f64>,
    #[schema(exclusive_minimum = 0)]
    pub readout_spread: Option<f64>,
    pub skip: Option<bool>,
    pub seed: Option<u64>,
    pub scale: Option<ScaleOption>,
    pub precision: Option<Precision>,
    #[schema(minimum = 1, maximum = 256)]
    pub horizon: Option<usize>,
    pub mixture: Option<bool>,
}

/// Validated options: every field present and in range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Options {
    pub cell: Cell,
    pub hidden: usize,
    pub lags: usize,
    pub inputs: usize,
    pub outputs: usize,
    pub ensemble: usize,
    pub method: Method,
    pub noise: f64,
    pub step: Step,
    pub loss: Loss,
    pub huber_delta: f64,
    pub momentum: bool,
    /// Steps after which the Nesterov coefficient n/(n+3) restarts from 0.
    pub momentum_restart: u64,
    pub spread: SpreadOption,
    pub inflation: f64,
    /// Spread of the prior around its centre, as a fraction of each weight's Glorot scale.
    pub prior_spread: f64,
    /// Prior spread of the read-out weights (centred at zero), as a fraction of the Glorot scale.
    pub readout_spread: f64,
    /// Whether the read-out sees the cell's inputs directly.
    pub skip: bool,
    pub seed: u64,
    pub scale: ScaleOption,
    /// What the ensemble stores and computes in (absent in snapshots older than the option:
    /// those were `f64`, whatever the default is now).
    #[serde(default = "precision_when_absent")]
    pub precision: Precision,
    /// Forecast steps whose intervals are calibrated: after every observation the forecast is
    /// rolled out this far and scored as the observations arrive (absent in older option
    /// files: the default).
    #[serde(default = "default_horizon")]
    pub horizon: usize,
    /// Whether the forecast combines the ensemble's mean particle with the online
    /// autoregression and persistence, weighted by their recent errors (absent in older option
    /// files: the default).
    #[serde(default = "default_mixture")]
    pub mixture: bool,
}

fn precision_when_absent() -> Precision {
    Precision::F64
}

fn default_mixture() -> bool {
    true
}

/// The calibrated forecast horizon when a stream's options name none: a day of hourly data.
pub const DEFAULT_HORIZON: usize = 24;

fn default_horizon() -> usize {
    DEFAULT_HORIZON
}

impl Default for Options {
    /// The product defaults (chosen on the training parts only; see BENCHMARKS.md).
    fn default() -> Self {
        Options {
            cell: Cell::Elman,
            hidden: 16,
            lags: 12,
            inputs: 0,
            outputs: 1,
            ensemble: 100,
            method: Method::Kalman,
            noise: 0.01,
            step: Step { h: 0.3, eps: 1e-8 },
            loss: Loss::Squared,
            huber_delta: 0.05,
            momentum: false,
            momentum_restart: 20,
            spread: SpreadOption::Off(Off::Off),
            inflation: 1.0,
            prior_spread: 0.1,
            readout_spread: 1.0,
            skip: true,
            seed: 0,
            scale: ScaleOption::Auto(Auto::Auto),
            // `f32`: every accuracy figure of `ekid eval` within 2e-4 (relative) of `f64`'s on
            // the validation collection and the bundled series, at 2–3× the speed
            // (BENCHMARKS.md, decisions).
            precision: Precision::F32,
            horizon: DEFAULT_HORIZON,
            mixture: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("option `{field}`: {reason}")]
pub struct OptionsError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> OptionsError {
    OptionsError {
        field,
        reason: reason.into(),
    }
}

fn in_range(field: &'static str, v: usize, lo: usize, hi: usize) -> Result<usize, OptionsError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(bad(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

fn positive(field: &'static str, v: f64) -> Result<f64, OptionsError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(bad(field, format!("must be a finite number > 0, got {v}")))
    }
}

impl RawOptions {
    /// Fills missing fields from `defaults` and validates the result.
    pub fn resolve(&self, defaults: &Options) -> Result<Options, OptionsError> {
        let o = Options {
            cell: self.cell.unwrap_or(defaults.cell),
            hidden: self.hidden.unwrap_or(defaults.hidden),
            lags: self.lags.unwrap_or(defaults.lags),
            inputs: self.inputs.unwrap_or(defaults.inputs),
            outputs: self.outputs.unwrap_or(defaults.outputs),
            ensemble: self.ensemble.unwrap_or(defaults.ensemble),
            method: self.method.unwrap_or(defaults.method),
            noise: self.noise.unwrap_or(defaults.noise),
            step: self.step.unwrap_or(defaults.step),
            loss: self.loss.unwrap_or(defaults.loss),
            huber_delta: self.huber_delta.unwrap_or(defaults.huber_delta),
            momentum: self.momentum.unwrap_or(defaults.momentum),
            momentum_restart: self.momentum_restart.unwrap_or(defaults.momentum_restart),
            spread: self.spread.unwrap_or(defaults.spread),
            inflation: self.inflation.unwrap_or(defaults.inflation),
            prior_spread: self.prior_spread.unwrap_or(defaults.prior_spread),
            readout_spread: self.readout_spread.unwrap_or(defaults.readout_spread),
            skip: self.skip.unwrap_or(defaults.skip),
            seed: self.seed.unwrap_or(defaults.seed),
            scale: self.scale.unwrap_or(defaults.scale),
            precision: self.precision.unwrap_or(defaults.precision),
            horizon: self.horizon.unwrap_or(defaults.horizon),
            mixture: self.mixture.unwrap_or(defaults.mixture),
        };
        o.check()
    }
}

impl Options {
    /// The one validation of options; everything that builds a model takes `Options` from here.
    pub fn check(self) -> Result<Options, OptionsError> {
        in_range("hidden", self.hidden, 1, 1024)?;
        in_range("lags", self.lags, 0, 1024)?;
        in_range("inputs", self.inputs, 0, 1024)?;
        in_range("outputs", self.outputs, 1, 64)?;
        in_range("ensemble", self.ensemble, 2, 1_000_000)?;
        in_range("horizon", self.horizon, 1, 256)?;
        if self.lags == 0 && self.inputs == 0 {
            return Err(bad(
                "lags",
                "a network with no lags and no inputs sees nothing",
            ));
        }
        if self.momentum_restart == 0 {
            return Err(bad("momentum_restart", "must be at least 1"));
        }
        positive("noise", self.noise)?;
        positive("step.h", self.step.h)?;
        positive("step.eps", self.step.eps)?;
        positive("huber_delta", self.huber_delta)?;
        positive("prior_spread", self.prior_spread)?;
        positive("readout_spread", self.readout_spread)?;
        if !(self.inflation.is_finite() && (1.0..=10.0).contains(&self.inflation)) {
            return Err(bad(
                "inflation",
                format!("must be between 1 (off) and 10, got {}", self.inflation),
            ));
        }
        if let Some(s) = self.spread.schedule() {
            if s.every == 0 {
                return Err(bad("spread.every", "must be at least 1"));
            }
            positive("spread.gamma", s.gamma)?;
            if !(s.decay.is_finite() && s.decay > 0.0 && s.decay <= 1.0) {
                return Err(bad(
                    "spread.decay",
                    format!("must be in (0, 1], got {}", s.decay),
                ));
            }
        }
        if let ScaleOption::Fixed(r) = self.scale
            && !(r.min.is_finite()
                && r.max.is_finite()
                && r.max > r.min
                && (r.max - r.min).is_finite())
        {
            return Err(bad(
                "scale",
                format!("needs finite min < max, got min {} max {}", r.min, r.max),
            ));
        }
        Ok(self)
    }

    pub fn layout(&self) -> Layout {
        Layout::new(
            self.hidden,
            self.lags * self.outputs + self.inputs,
            self.outputs,
        )
    }

    /// Bytes the ensemble's parameters occupy (J·d values of the precision).
    pub fn ensemble_bytes(&self) -> usize {
        self.ensemble * self.layout().dim() * self.precision.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_rejected() {
        assert!(Options::default().check().is_ok());
        let err = serde_json::from_str::<RawOptions>(r#"{"hiden": 3}"#).unwrap_err();
        assert!(err.to_string().contains("hiden"), "{err}");
    }

    #[test]
    fn spread_and_scale_accept_both_forms() {
        let r: RawOptions = serde_json::from_str(
            r#"{"spread": {"every": 50, "gamma": 0.1}, "scale": {"min": 0, "max": 10}}"#,
        )
        .unwrap();
        let o = r.resolve(&Options::default()).unwrap();
        assert_eq!(o.spread.schedule().unwrap().every, 50);
        let r: RawOptions = serde_json::from_str(r#"{"spread": "off", "scale": "auto"}"#).unwrap();
        assert!(
            r.resolve(&Options::default())
                .unwrap()
                .spread
                .schedule()
                .is_none()
        );
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let cases = [
            (r#"{"noise": 0}"#, "noise"),
            (r#"{"ensemble": 1}"#, "ensemble"),
            (r#"{"inflation": 0.5}"#, "inflation"),
            (r#"{"lags": 0}"#, "lags"),
            (r#"{"scale": {"min": 3, "max": 3}}"#, "scale"),
            (r#"{"scale": {"min": -1e308, "max": 1e308}}"#, "scale"),
            (r#"{"spread": {"every": 0, "gamma": 1}}"#, "spread.every"),
        ];
        for (json, field) in cases {
            let r: RawOptions = serde_json::from_str(json).unwrap();
            let e = r.resolve(&Options::default()).unwrap_err();
            assert_eq!(e.field, field, "{json}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn field() -> impl Strategy<Value = (String, serde_json::Value)> {
            let names = prop_oneof![
                Just("hidden"),
                Just("lags"),
                Just("inputs"),
                Just("outputs"),
                Just("ensemble"),
                Just("noise"),
                Just("inflation"),
                Just("prior_spread"),
                Just("seed"),
                Just("method"),
                Just("spread"),
                Just("scale"),
                Just("step"),
                Just("momentum"),
                Just("bogus"),
            ];
            let values = prop_oneof![
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(|f| serde_json::json!(f)),
                Just(serde_json::json!("off")),
                Just(serde_json::json!("kalman")),
                Just(serde_json::json!({"every": 3, "gamma": 0.5})),
                Just(serde_json::json!({"min": -1, "max": 1})),
                Just(serde_json::json!({"h": 0.1, "eps": 1e-6})),
                Just(serde_json::json!(true)),
                Just(serde_json::json!(null)),
            ];
            (names, values).prop_map(|(n, v)| (n.to_owned(), v))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any object either fails to parse or validate with a named field, or resolves to
            /// options that pass `check` and survive a JSON round trip unchanged.
            #[test]
            fn option_objects_validate_or_name_a_field(fields in proptest::collection::vec(field(), 0..6)) {
                let obj: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
                let text = serde_json::Value::Object(obj).to_string();
                if let Ok(raw) = serde_json::from_str::<RawOptions>(&text) {
                    match raw.resolve(&Options::default()) {
                        Ok(o) => {
                            prop_assert!(o.clone().check().is_ok());
                            let back: Options = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
                            prop_assert_eq!(back, o);
                        }
                        Err(e) => prop_assert!(!e.field.is_empty() && !e.reason.is_empty()),
                    }
                }
            }
        }
    }
}

/// Options use untagged enums (`"off"` or a schedule), which compact binary formats cannot
/// decode; inside a snapshot they travel as their JSON text.
pub mod json_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::Options;

    pub fn serialize<S: Serializer>(o: &Options, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(o).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Options, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}
