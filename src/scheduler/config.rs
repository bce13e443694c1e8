//! `scheduler/scheduler_config.json`, typed.

use std::path::Path;

use serde_json::Value;

use crate::error::{boxed, Component, Error, Result};
use crate::model_config::read_config;

/// How `use_dynamic_shifting` bends the sigmas (diffusers `time_shift_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeShiftType {
    /// `e^mu / (e^mu + (1/s - 1))`.
    #[default]
    Exponential,
    /// `mu / (mu + (1/s - 1))`.
    Linear,
}

/// The settings of diffusers' `FlowMatchEulerDiscreteScheduler` that change the schedule.
/// Defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FlowMatchConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// The timestep shift (3.0 in SD3's config; the constructor default is 1.0).
    pub shift: f64,
    /// Resolution-dependent shifting with `mu`.
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len`.
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len`.
    pub max_shift: f64,
    /// Image tokens where `mu = base_shift`.
    pub base_image_seq_len: f64,
    /// Image tokens where `mu = max_shift`.
    pub max_image_seq_len: f64,
    /// Use `1 - sigma`.
    pub invert_sigmas: bool,
    /// Stretch the schedule so it ends at this sigma.
    pub shift_terminal: Option<f64>,
    /// Dynamic shift formula.
    pub time_shift_type: TimeShiftType,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256.0,
            max_image_seq_len: 4096.0,
            invert_sigmas: false,
            shift_terminal: None,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

impl FlowMatchConfig {
    /// Reads `scheduler_config.json`. Options we do not implement (Karras, exponential or beta sigmas,
    /// stochastic sampling) are errors rather than silently ignored.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let hint = "The model folder needs scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)";
        read_config(Component::Scheduler, path.as_ref(), hint, Self::from_json_str)
    }

    /// Parses the text of `scheduler_config.json` (what [`from_file`](Self::from_file) reads). The
    /// [`Error::InvalidConfig`] says what is wrong, without a file name.
    ///
    /// ```
    /// use sd3_onnx::FlowMatchConfig;
    /// let cfg = FlowMatchConfig::from_json_str(r#"{"shift": 3.0}"#).unwrap();
    /// assert_eq!(cfg.shift, 3.0);
    /// assert!(FlowMatchConfig::from_json_str(r#"{"use_karras_sigmas": true}"#).is_err());
    /// ```
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::InvalidConfig {
            component: Component::Scheduler,
            path: None,
            message: format!("not json: {e}"),
            source: boxed(e),
        })?;
        Self::from_json(&v)
    }

    /// Reads the config from parsed json.
    pub fn from_json(v: &Value) -> Result<Self> {
        Self::parse(v).map_err(|m| Error::config(Component::Scheduler, m))
    }

    fn parse(v: &Value) -> std::result::Result<Self, String> {
        if !v.is_object() {
            return Err("expected a json object".into());
        }
        let d = FlowMatchConfig::default();
        if let Some(class) = v.get("_class_name").and_then(Value::as_str) {
            if class != "FlowMatchEulerDiscreteScheduler" {
                return Err(format!(
                    "scheduler class {class} is not supported; expected FlowMatchEulerDiscreteScheduler"
                ));
            }
        }
        let num = |key: &str, default: f64| -> std::result::Result<f64, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => {
                    x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| format!("`{key}` must be a number, got {x}"))
                }
            }
        };
        let flag = |key: &str| -> std::result::Result<bool, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(x) => x.as_bool().ok_or_else(|| format!("`{key}` must be true or false, got {x}")),
            }
        };
        for unsupported in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"] {
            if flag(unsupported)? {
                return Err(format!("`{unsupported}` is not supported by sd3-onnx's flow-match scheduler"));
            }
        }
        let steps = num("num_train_timesteps", d.num_train_timesteps as f64)?;
        if !(1.0..=100_000.0).contains(&steps) || steps.fract() != 0.0 {
            return Err(format!("`num_train_timesteps` must be a positive integer, got {steps}"));
        }
        let shift = num("shift", d.shift)?;
        if shift <= 0.0 {
            return Err(format!("`shift` must be positive, got {shift}"));
        }
        let time_shift_type = match v.get("time_shift_type").and_then(Value::as_str) {
            None | Some("exponential") => TimeShiftType::Exponential,
            Some("linear") => TimeShiftType::Linear,
            Some(other) => return Err(format!("`time_shift_type` must be exponential or linear, got {other}")),
        };
        let shift_terminal = match v.get("shift_terminal") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                x.as_f64()
                    .filter(|t| *t < 1.0)
                    .ok_or_else(|| format!("`shift_terminal` must be a number below 1, got {x}"))?,
            ),
        };
        let cfg = FlowMatchConfig {
            num_train_timesteps: steps as usize,
            shift,
            use_dynamic_shifting: flag("use_dynamic_shifting")?,
            base_shift: num("base_shift", d.base_shift)?,
            max_shift: num("max_shift", d.max_shift)?,
            base_image_seq_len: num("base_image_seq_len", d.base_image_seq_len)?,
            max_image_seq_len: num("max_image_seq_len", d.max_image_seq_len)?,
            invert_sigmas: flag("invert_sigmas")?,
            shift_terminal,
            time_shift_type,
        };
        if cfg.use_dynamic_shifting && cfg.max_image_seq_len == cfg.base_image_seq_len {
            return Err("`max_image_seq_len` must differ from `base_image_seq_len` for dynamic shifting".into());
        }
        Ok(cfg)
    }
}
