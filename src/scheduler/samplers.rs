//! Samplers for the denoising loop: diffusers' flow-matching Euler, Heun and DPM-Solver++ (2M) schedulers, as
//! pure maths with the step state in a [`Sampler`] value.
//!
//! References, all diffusers 0.42.1 (the same maths as 0.35.2; docs/diffusers-versions.md):
//! - Euler: `schedulers/scheduling_flow_match_euler_discrete.py` (`FlowMatchEulerDiscreteScheduler`), through
//!   [`FlowMatchConfig::schedule`] and [`euler_step`].
//! - Heun: `schedulers/scheduling_flow_match_heun_discrete.py` (`FlowMatchHeunDiscreteScheduler`: `__init__`,
//!   `set_timesteps`, `step`).
//! - DPM-Solver++ (2M): `schedulers/scheduling_dpmsolver_multistep.py` (`DPMSolverMultistepScheduler` with
//!   `use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2`,
//!   `flow_shift` = the config's `shift`, everything else at its default: `solver_type="midpoint"`,
//!   `final_sigmas_type="zero"`, `lower_order_final=True`, `euler_at_final=False`, no thresholding).
//! - The loop: `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py` (`StableDiffusion3Pipeline.__call__`
//!   calls `scheduler.step(noise_pred, t, latents)` once per entry of `scheduler.timesteps` and gives the
//!   transformer `t` as its `timestep`).
//!
//! Float widths follow the reference: schedules are computed in `f64` (numpy) and rounded to `f32` once; the
//! steps are `f32` (torch, float32 latents and model outputs). DPM-Solver++ takes `log`/`exp` of `f32` scalars
//! (torch 0-dim tensors); we evaluate them in `f64` and round to `f32` (correctly rounded, the same on every
//! platform), where torch's vectorised `f32` `log`/`exp` are within 1 ulp of that, so DPM-Solver++ trajectories
//! agree with diffusers to about 1e-6, not always to the bit. Euler and Heun use only `+ - * /` and agree
//! bit for bit.

use std::fmt;
use std::str::FromStr;

use super::{euler_step, linspace, FlowMatchConfig, Schedule, TimeShiftType};
use crate::error::{Error, Result};

/// Upper bound for `num_train_timesteps` (the same bound `FlowMatchConfig::from_json` enforces), which also
/// bounds the number of steps a [`Sampler`] accepts.
const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// Which sampler runs the denoising loop.
///
/// With the `serde` feature it is written as its [name](SamplerKind::name) (`"euler"`, `"heun"`, `"dpmpp_2m"`)
/// and read as [`FromStr`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SamplerKind {
    /// First-order Euler: diffusers' `FlowMatchEulerDiscreteScheduler`, SD3's own scheduler. One transformer
    /// evaluation per step.
    #[default]
    Euler,
    /// Second-order Heun: diffusers' `FlowMatchHeunDiscreteScheduler`. Two evaluations per step except the last
    /// (`2 * steps - 1` in all), so about twice the time of Euler for the same `steps`.
    Heun,
    /// DPM-Solver++ (2M), second-order multistep: diffusers' `DPMSolverMultistepScheduler` with flow sigmas and
    /// `flow_prediction`. One evaluation per step; the first and the last steps are first order.
    DpmSolverPlusPlus2M,
}

impl SamplerKind {
    /// Every sampler, in the order of [`SamplerKind::name`]'s documentation.
    pub const ALL: [SamplerKind; 3] = [SamplerKind::Euler, SamplerKind::Heun, SamplerKind::DpmSolverPlusPlus2M];

    /// The sampler's name: `"euler"`, `"heun"` or `"dpmpp_2m"` (what [`FromStr`] accepts).
    pub fn name(&self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::Heun => "heun",
            SamplerKind::DpmSolverPlusPlus2M => "dpmpp_2m",
        }
    }

    /// The diffusers scheduler class this sampler reproduces.
    pub fn diffusers_class(&self) -> &'static str {
        match self {
            SamplerKind::Euler => "FlowMatchEulerDiscreteScheduler",
            SamplerKind::Heun => "FlowMatchHeunDiscreteScheduler",
            SamplerKind::DpmSolverPlusPlus2M => "DPMSolverMultistepScheduler",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    /// Parses `euler`, `heun`, `dpmpp_2m` (also written `dpm++2m`), ignoring ASCII case and surrounding spaces.
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "euler" => Ok(SamplerKind::Euler),
            "heun" => Ok(SamplerKind::Heun),
            "dpmpp_2m" | "dpm++2m" => Ok(SamplerKind::DpmSolverPlusPlus2M),
            _ => Err(Error::request("sampler", s, "expected one of euler, heun, dpmpp_2m (or dpm++2m)")),
        }
    }
}

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl serde::Serialize for SamplerKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl<'de> serde::Deserialize<'de> for SamplerKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = SamplerKind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sampler name: euler, heun or dpmpp_2m")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<SamplerKind, E> {
                s.parse().map_err(|_| E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// A sampler's state for one run: its timesteps and sigmas, how far the run is, and what the sampler keeps
/// between evaluations (Heun's first-order half, DPM-Solver++'s previous data prediction).
///
/// A denoising loop runs `for i in 0..sampler.len()`: it evaluates the transformer on the current sample with
/// `timestep = sampler.timesteps()[i]` (the same for every image of the batch), applies classifier-free guidance,
/// and passes the guided velocity to [`Sampler::step`], which updates the sample in place:
///
/// ```
/// use sd3_onnx::scheduler::{FlowMatchConfig, Sampler, SamplerKind};
///
/// # fn main() -> sd3_onnx::Result<()> {
/// let mut config = FlowMatchConfig::default(); // or FlowMatchConfig::from_file(scheduler_config.json)
/// config.shift = 3.0;
/// let mut sampler = Sampler::new(SamplerKind::Heun, &config, 4, None)?;
/// assert_eq!(sampler.len(), 7); // Heun evaluates the model 2 * steps - 1 times
/// let mut latents = vec![0.5f32; 16];
/// while sampler.index() < sampler.len() {
///     let t = sampler.timesteps()[sampler.index()];
///     // The transformer's (guided) velocity at (latents, t); a stand-in here.
///     let velocity: Vec<f32> = latents.iter().map(|x| 0.7 * x + t / 1000.0).collect();
///     sampler.step(&velocity, &mut latents)?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Sampler {
    kind: SamplerKind,
    /// One per evaluation: what the transformer gets as `timestep`.
    timesteps: Vec<f32>,
    /// diffusers' `scheduler.sigmas` after `set_timesteps` (see [`Sampler::sigmas`]).
    sigmas: Vec<f32>,
    /// The next evaluation.
    index: usize,
    /// The sample length of the first step; later steps must match it.
    numel: Option<usize>,
    state: State,
}

/// What a sampler keeps between evaluations.
#[derive(Debug, Clone)]
enum State {
    /// Euler keeps nothing.
    Euler,
    /// `FlowMatchHeunDiscreteScheduler`'s `prev_derivative`, `dt` and `sample`, set by a first-order half and
    /// consumed by the second-order half that follows; `dt` is `None` in "first order" state
    /// (`state_in_first_order`).
    Heun { prev_derivative: Vec<f32>, dt: Option<f32>, sample: Vec<f32> },
    /// `DPMSolverMultistepScheduler`'s `model_outputs` (solver_order 2: the data predictions `x0` of this
    /// evaluation and of the previous one) and `lower_order_nums`.
    Dpm { x0: Vec<f32>, prev_x0: Vec<f32>, lower_order_nums: usize },
}

impl Sampler {
    /// The timesteps and sigmas of `kind` for `steps` steps with `config` (`shift` and the other settings of
    /// `scheduler_config.json`).
    ///
    /// `mu` is the resolution-dependent shift ([`calculate_shift`](super::calculate_shift) of the image's token
    /// count); it is required when `config.use_dynamic_shifting` is set and ignored otherwise, like
    /// [`FlowMatchConfig::schedule`].
    ///
    /// Which settings each sampler honours (the others are errors, not silently ignored):
    /// - Euler: all of [`FlowMatchConfig`] (this is [`FlowMatchConfig::schedule`]).
    /// - Heun: `num_train_timesteps` and `shift`. diffusers' Heun scheduler has no dynamic shifting, no
    ///   `shift_terminal` and no `invert_sigmas`, so those are errors.
    /// - DPM-Solver++ (2M): `num_train_timesteps`, `shift` (as `flow_shift`) and `use_dynamic_shifting` with
    ///   `time_shift_type` exponential (`flow_shift = exp(mu)`); the linear time shift, `shift_terminal` and
    ///   `invert_sigmas` are errors.
    ///
    /// Errors: `steps` is 0 or more than `num_train_timesteps`, `num_train_timesteps` is 0 or above 100000,
    /// `shift` is not a positive number, `mu` is missing or not finite where it is needed, or the sampler cannot
    /// honour a setting of `config` (the message says what to change).
    ///
    /// A run always starts at evaluation 0, as diffusers does after `set_begin_index(0)`. Without it diffusers'
    /// `step` finds its start with `index_for_timestep(timesteps[0])`, which picks the *second* match when the
    /// first timestep repeats: DPM-Solver++'s truncated integer timesteps do for many step counts above ~500 at
    /// shift 3 (e.g. 501, 600, 700: `[999, 999, 998, ...]`), and the SD3 pipeline then fails with an
    /// `IndexError` at its last step. Below that the two agree.
    pub fn new(kind: SamplerKind, config: &FlowMatchConfig, steps: usize, mu: Option<f64>) -> Result<Sampler> {
        check_common(config, steps, mu)?;
        let (timesteps, sigmas, state) = match kind {
            SamplerKind::Euler => {
                let schedule = config.schedule(steps, mu)?;
                (schedule.timesteps, schedule.sigmas, State::Euler)
            }
            SamplerKind::Heun => {
                check_heun(config)?;
                let (timesteps, sigmas) = heun_schedule(config, steps)?;
                (timesteps, sigmas, State::Heun { prev_derivative: Vec::new(), dt: None, sample: Vec::new() })
            }
            SamplerKind::DpmSolverPlusPlus2M => {
                let flow_shift = dpm_flow_shift(config, mu)?;
                let (timesteps, sigmas) = dpm_flow_schedule(config.num_train_timesteps, flow_shift, steps);
                (timesteps, sigmas, State::Dpm { x0: Vec::new(), prev_x0: Vec::new(), lower_order_nums: 0 })
            }
        };
        Ok(Sampler { kind, timesteps, sigmas, index: 0, numel: None, state })
    }

    /// FlowMatch Euler over an explicit schedule: the one [`FlowMatchConfig::schedule`] returns, or part of it
    /// ([`Schedule::skip`]: img2img and inpainting start part-way down). `Sampler::new(SamplerKind::Euler, ..)`
    /// is `Sampler::euler(config.schedule(..)?)`.
    ///
    /// ```
    /// use sd3_onnx::scheduler::{FlowMatchConfig, Sampler};
    /// # fn main() -> sd3_onnx::Result<()> {
    /// let full = FlowMatchConfig::default().schedule(10, None)?;
    /// let img2img = Sampler::euler(full.skip(4)); // strength 0.6 of 10 steps
    /// assert_eq!(img2img.len(), 6);
    /// # Ok(())
    /// # }
    /// ```
    pub fn euler(schedule: Schedule) -> Sampler {
        Sampler {
            kind: SamplerKind::Euler,
            timesteps: schedule.timesteps,
            sigmas: schedule.sigmas,
            index: 0,
            numel: None,
            state: State::Euler,
        }
    }

    /// Which sampler this is.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// One entry per transformer evaluation (Heun has `2 * steps - 1`): what the transformer gets as `timestep`
    /// at evaluation `i`, diffusers' `scheduler.timesteps` as `f32`. For DPM-Solver++ these are whole numbers
    /// (diffusers keeps them as `int64`, `sigma * num_train_timesteps` truncated).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// diffusers' `scheduler.sigmas` after `set_timesteps`, as `f32`: `steps + 1` values for Euler and
    /// DPM-Solver++ (the last is 0; for DPM-Solver++ the first is `shift(1 - 1/num_train_timesteps)`, not 1);
    /// for Heun `2 * steps` values `[s0, s1, s1, s2, s2, ..., s(n-1), s(n-1), 0]`.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The noise level of the sample the transformer sees at evaluation `i` (for progress reports):
    /// `sigmas()[i]`. `sigma(len())` is the final level (0, or 1 with Euler's `invert_sigmas`), and so is any
    /// index past it.
    pub fn sigma(&self, i: usize) -> f32 {
        let i = i.min(self.timesteps.len());
        self.sigmas.get(i).copied().unwrap_or(0.0)
    }

    /// The evaluation the next [`Sampler::step`] expects the model output of (0 before the first step,
    /// [`Sampler::len`] when the run is complete).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of transformer evaluations (calls to [`Sampler::step`]) of a run.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// True when the run has no evaluations (never the case for a sampler from [`Sampler::new`]).
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// Advances by one evaluation: `sample` is updated in place from `model_output`, the model's velocity for
    /// evaluation [`Sampler::index`] (with classifier-free guidance: the guided velocity
    /// `uncond + guidance * (cond - uncond)`), computed on the `sample` passed here at
    /// `timestep = self.timesteps()[self.index()]`.
    ///
    /// `sample` must be the sample the model was evaluated on: Heun's second half and DPM-Solver++ both combine
    /// it with state from earlier evaluations. All images of a batch can go through one call (every operation
    /// is element-wise); the length must then stay the same for the whole run.
    ///
    /// Errors: the run is complete, `model_output` and `sample` differ in length, or the length differs from the
    /// first step's. On error nothing is changed.
    pub fn step(&mut self, model_output: &[f32], sample: &mut [f32]) -> Result<()> {
        let i = self.index;
        if i >= self.timesteps.len() {
            return Err(Error::request(
                "step",
                i,
                format!("the {} run has {} evaluations and all are done", self.kind, self.timesteps.len()),
            ));
        }
        if model_output.len() != sample.len() {
            return Err(Error::request(
                "model_output",
                model_output.len(),
                format!("the model output must have as many values as the sample ({})", sample.len()),
            ));
        }
        if let Some(n) = self.numel.filter(|n| *n != sample.len()) {
            return Err(Error::request(
                "sample",
                sample.len(),
                format!("the sample must keep the length of the first step ({n}) for the whole run"),
            ));
        }
        if self.sigmas.len() <= i + 1 {
            return Err(Error::request(
                "sigmas",
                self.sigmas.len(),
                format!("evaluation {i} needs sigmas {i} and {} (a schedule has one more sigma than timesteps)", i + 1),
            ));
        }
        self.numel = Some(sample.len());
        let last = self.timesteps.len() - 1;
        match &mut self.state {
            // FlowMatchEulerDiscreteScheduler.step: prev_sample = sample + (sigma_next - sigma) * model_output.
            State::Euler => euler_step(sample, model_output, self.sigmas[i], self.sigmas[i + 1]),
            State::Heun { prev_derivative, dt, sample: saved } => {
                heun_step(&self.sigmas, i, prev_derivative, dt, saved, model_output, sample)
            }
            State::Dpm { x0, prev_x0, lower_order_nums } => {
                dpm_step(&self.sigmas, i, i == last, x0, prev_x0, lower_order_nums, model_output, sample)
            }
        }
        self.index += 1;
        Ok(())
    }
}

/// What one evaluation's update needs besides the tensors, for a loop that runs the arithmetic elsewhere (the
/// device loop's small ONNX graphs, src/runtime/step.rs): the same scalars, computed by the same code, as
/// [`Sampler::step`] uses, and which form of the update applies. The element-wise formulas are those of
/// `euler_step`, `heun_step` and `dpm_step`, in the same order of operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum StepScalars {
    /// `x + dt * v`.
    Euler { dt: f32 },
    /// Heun's first-order half: `d = (x - (x - v * sigma)) / sigma_hat`, `x + d * dt`; keeps `d` and `x`.
    HeunFirst { sigma: f32, sigma_hat: f32, dt: f32 },
    /// Heun's second-order half: `d = 0.5 * (d1 + (x - (x - v * sigma_next)) / sigma_next)`, `saved + d * dt`.
    HeunSecond { sigma_next: f32, dt: f32 },
    /// DPM-Solver++ first order: `x0 = x - sigma * v`, `ratio * x - coef * x0`; keeps `x0`.
    DpmFirst { sigma: f32, ratio: f32, coef: f32 },
    /// DPM-Solver++ second order: `x0 = x - sigma * v`, `ratio * x - coef * x0 - half_coef * (inv_r0 * (x0 -
    /// prev_x0))`; keeps `x0`.
    DpmSecond { sigma: f32, inv_r0: f32, ratio: f32, coef: f32, half_coef: f32 },
}

impl Sampler {
    /// Advances by one evaluation like [`Sampler::step`], without the tensors: returns the scalars of the update
    /// the caller applies itself (the device loop), and keeps the sampler's scalar state (Heun's `dt`, DPM's
    /// `lower_order_nums`). A sampler is driven either by `step` or by `advance`, not both in one run.
    pub(crate) fn advance(&mut self) -> Result<StepScalars> {
        let i = self.index;
        if i >= self.timesteps.len() || self.sigmas.len() <= i + 1 {
            return Err(Error::request(
                "step",
                i,
                format!("the {} run has {} evaluations and all are done", self.kind, self.timesteps.len()),
            ));
        }
        let last = self.timesteps.len() - 1;
        let scalars = match &mut self.state {
            State::Euler => StepScalars::Euler { dt: self.sigmas[i + 1] - self.sigmas[i] },
            State::Heun { dt, .. } => match *dt {
                None => {
                    // heun_step's first half: sigma_hat = sigma (gamma = 0), dt = sigma_next - sigma_hat.
                    let sigma = self.sigmas[i];
                    let step_dt = self.sigmas[i + 1] - sigma;
                    *dt = Some(step_dt);
                    StepScalars::HeunFirst { sigma, sigma_hat: sigma, dt: step_dt }
                }
                Some(step_dt) => {
                    *dt = None;
                    StepScalars::HeunSecond { sigma_next: self.sigmas[i], dt: step_dt }
                }
            },
            State::Dpm { lower_order_nums, .. } => {
                let sigma = self.sigmas[i];
                let out = if *lower_order_nums < 1 || i == last {
                    let (ratio, coef) = dpm_first_order_scalars(self.sigmas[i + 1], sigma);
                    StepScalars::DpmFirst { sigma, ratio, coef }
                } else {
                    let (inv_r0, ratio, coef, half_coef) =
                        dpm_second_order_scalars(self.sigmas[i + 1], sigma, self.sigmas[i - 1]);
                    StepScalars::DpmSecond { sigma, inv_r0, ratio, coef, half_coef }
                };
                if *lower_order_nums < 2 {
                    *lower_order_nums += 1;
                }
                out
            }
        };
        self.index += 1;
        Ok(scalars)
    }
}

/// Checks shared by every sampler: the step count, the training range, `shift` and `mu`.
fn check_common(config: &FlowMatchConfig, steps: usize, mu: Option<f64>) -> Result<()> {
    let n_train = config.num_train_timesteps;
    if n_train == 0 || n_train > MAX_TRAIN_TIMESTEPS {
        return Err(Error::request(
            "num_train_timesteps",
            n_train,
            format!("the scheduler config needs 1 to {MAX_TRAIN_TIMESTEPS} training timesteps"),
        ));
    }
    if steps == 0 || steps > n_train {
        return Err(Error::request(
            "steps",
            steps,
            format!("between 1 and num_train_timesteps = {n_train} denoising steps are needed"),
        ));
    }
    if !(config.shift.is_finite() && config.shift > 0.0) {
        return Err(Error::request("shift", config.shift, "the scheduler's shift must be a positive number"));
    }
    if config.use_dynamic_shifting {
        match mu {
            None => {
                return Err(Error::request(
                    "mu",
                    "none",
                    "use_dynamic_shifting is set, so mu (calculate_shift of the image's token count) is required",
                ))
            }
            Some(m) if !m.is_finite() => return Err(Error::request("mu", m, "mu must be a finite number")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The error for a `scheduler_config.json` setting a sampler cannot honour.
fn unsupported(kind: SamplerKind, setting: &str, fix: &str) -> Error {
    Error::request(
        "sampler",
        kind,
        format!(
            "diffusers' {} has no `{setting}`, so the {kind} sampler cannot honour it: {fix}",
            kind.diffusers_class()
        ),
    )
}

/// `shift_terminal` is "on" when set and non-zero, as in `FlowMatchEulerDiscreteScheduler.set_timesteps`
/// (`if self.config.shift_terminal:`).
fn uses_shift_terminal(config: &FlowMatchConfig) -> bool {
    config.shift_terminal.is_some_and(|t| t != 0.0)
}

/// Heun supports `num_train_timesteps` and `shift` only (the arguments of
/// `FlowMatchHeunDiscreteScheduler.__init__`; its `set_timesteps` takes no `mu`).
fn check_heun(config: &FlowMatchConfig) -> Result<()> {
    let kind = SamplerKind::Heun;
    if config.use_dynamic_shifting {
        return Err(unsupported(
            kind,
            "use_dynamic_shifting",
            "its set_timesteps takes no mu (and FlowMatchHeunDiscreteScheduler.from_config drops the setting and \
             uses the static `shift`); set use_dynamic_shifting to false and choose `shift` in \
             scheduler_config.json, or use the euler or dpmpp_2m sampler",
        ));
    }
    if uses_shift_terminal(config) {
        return Err(unsupported(
            kind,
            "shift_terminal",
            "remove shift_terminal from scheduler_config.json (or set it to null), or use the euler sampler",
        ));
    }
    if config.invert_sigmas {
        return Err(unsupported(kind, "invert_sigmas", "set invert_sigmas to false, or use the euler sampler"));
    }
    Ok(())
}

/// `FlowMatchHeunDiscreteScheduler.set_timesteps`: the Euler scheduler's static-shift sigmas (its `__init__` and
/// `set_timesteps` are the same formulas: training sigmas shifted in `f32`, `np.linspace` and the shift in `f64`,
/// rounded to `f32`, `timesteps = sigmas * num_train_timesteps` in `f32`), then every sigma but the first and the
/// final 0 repeated:
/// `timesteps = cat([t[:1], t[1:].repeat_interleave(2)])`,
/// `sigmas = cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])` with `s` ending in 0.
fn heun_schedule(config: &FlowMatchConfig, steps: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let base = config.schedule(steps, None)?;
    let mut timesteps = Vec::with_capacity(2 * steps - 1);
    let mut sigmas = Vec::with_capacity(2 * steps);
    for (i, (&t, &s)) in base.timesteps.iter().zip(&base.sigmas).enumerate() {
        let copies = if i == 0 { 1 } else { 2 };
        timesteps.extend(std::iter::repeat_n(t, copies));
        sigmas.extend(std::iter::repeat_n(s, copies));
    }
    sigmas.push(0.0); // torch.zeros(1): final_sigma 0
    Ok((timesteps, sigmas))
}

/// One evaluation of `FlowMatchHeunDiscreteScheduler.step` with its defaults (`s_churn = 0`, so `gamma = 0`,
/// `sigma_hat = sigma * (gamma + 1) = sigma` and no noise), in `f32` and in diffusers' order of operations.
///
/// First-order half (`dt` is `None`): `sigma = sigmas[i]`, `sigma_next = sigmas[i + 1]`,
/// `denoised = sample - model_output * sigma`, `derivative = (sample - denoised) / sigma_hat`,
/// `dt = sigma_next - sigma_hat`; `prev_derivative`, `dt` and `sample` are kept; `sample + derivative * dt`.
///
/// Second-order half: `sigma_next = sigmas[i]`, `denoised = sample - model_output * sigma_next`,
/// `derivative = 0.5 * (prev_derivative + (sample - denoised) / sigma_next)`, and the result is
/// `kept_sample + derivative * dt`; the state returns to first order.
fn heun_step(
    sigmas: &[f32],
    i: usize,
    prev_derivative: &mut Vec<f32>,
    dt: &mut Option<f32>,
    saved: &mut Vec<f32>,
    model_output: &[f32],
    sample: &mut [f32],
) {
    match *dt {
        None => {
            let sigma = sigmas[i];
            let sigma_next = sigmas[i + 1];
            let sigma_hat = sigma; // sigma * (gamma + 1) with gamma = 0.0: exact
            let step_dt = sigma_next - sigma_hat;
            prev_derivative.clear();
            saved.clear();
            saved.extend_from_slice(sample);
            for (x, v) in sample.iter_mut().zip(model_output) {
                let denoised = *x - v * sigma;
                let derivative = (*x - denoised) / sigma_hat;
                prev_derivative.push(derivative);
                *x += derivative * step_dt;
            }
            *dt = Some(step_dt);
        }
        Some(step_dt) => {
            let sigma_next = sigmas[i];
            for (((x, v), d1), x1) in sample.iter_mut().zip(model_output).zip(prev_derivative.iter()).zip(saved.iter())
            {
                let denoised = *x - v * sigma_next;
                let derivative = 0.5 * (d1 + (*x - denoised) / sigma_next);
                *x = x1 + derivative * step_dt;
            }
            *dt = None;
        }
    }
}

/// DPM-Solver++ supports `num_train_timesteps`, `shift` (its `flow_shift`) and exponential dynamic shifting.
/// Returns the `flow_shift` of the run: `config.shift`, or `exp(mu)` with `use_dynamic_shifting`
/// (`DPMSolverMultistepScheduler.set_timesteps`: `if mu is not None: assert use_dynamic_shifting and
/// time_shift_type == "exponential"; self.config.flow_shift = np.exp(mu)`).
fn dpm_flow_shift(config: &FlowMatchConfig, mu: Option<f64>) -> Result<f64> {
    let kind = SamplerKind::DpmSolverPlusPlus2M;
    if uses_shift_terminal(config) {
        return Err(unsupported(
            kind,
            "shift_terminal",
            "remove shift_terminal from scheduler_config.json (or set it to null), or use the euler sampler",
        ));
    }
    if config.invert_sigmas {
        return Err(unsupported(kind, "invert_sigmas", "set invert_sigmas to false, or use the euler sampler"));
    }
    if !config.use_dynamic_shifting {
        return Ok(config.shift);
    }
    if config.time_shift_type != TimeShiftType::Exponential {
        return Err(Error::request(
            "sampler",
            kind,
            "DPMSolverMultistepScheduler shifts dynamically only with time_shift_type \"exponential\" \
             (flow_shift = exp(mu)); set time_shift_type to exponential in scheduler_config.json, or use the \
             euler sampler",
        ));
    }
    // check_common made sure mu is there and finite.
    let mu = mu.unwrap_or(0.0);
    let flow_shift = mu.exp();
    if !(flow_shift.is_finite() && flow_shift > 0.0) {
        return Err(Error::request("mu", mu, "exp(mu), the dynamic flow_shift, must be a positive finite number"));
    }
    Ok(flow_shift)
}

/// `DPMSolverMultistepScheduler.set_timesteps` with `use_flow_sigmas` and `final_sigmas_type="zero"`, in `f64`
/// as numpy computes it:
/// `alphas = np.linspace(1, 1 / num_train_timesteps, steps + 1)`, `sigmas = 1.0 - alphas`,
/// `sigmas = np.flip(flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas))[:-1]` (dropping the shifted 0),
/// `timesteps = sigmas * num_train_timesteps` converted to `int64` (truncation toward zero), and
/// `sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)`.
fn dpm_flow_schedule(num_train_timesteps: usize, flow_shift: f64, steps: usize) -> (Vec<f32>, Vec<f32>) {
    let n_train = num_train_timesteps as f64;
    let shifted: Vec<f64> = linspace(1.0, 1.0 / n_train, steps + 1)
        .into_iter()
        .map(|alpha| {
            let s = 1.0 - alpha;
            flow_shift * s / (1.0 + (flow_shift - 1.0) * s)
        })
        .collect();
    // np.flip(...)[:-1]: reversed, without shifted[0] (alpha 1, sigma 0).
    let sigmas64: Vec<f64> = shifted[1..].iter().rev().copied().collect();
    // torch.from_numpy(timesteps).to(dtype=torch.int64): C conversion, truncation toward zero. The values are
    // below num_train_timesteps <= 100000, so the f32 the transformer gets is exact.
    let timesteps = sigmas64.iter().map(|s| (s * n_train).trunc() as f32).collect();
    let mut sigmas: Vec<f32> = sigmas64.iter().map(|&s| s as f32).collect();
    sigmas.push(0.0); // final_sigmas_type "zero": sigma_last = 0
    (timesteps, sigmas)
}

/// `log` of an `f32` as torch's 0-dim `torch.log`, up to torch's last bit: evaluated in `f64` and rounded.
fn ln_f32(x: f32) -> f32 {
    f64::from(x).ln() as f32
}

/// `exp` of an `f32` as torch's 0-dim `torch.exp`, up to torch's last bit: evaluated in `f64` and rounded.
fn exp_f32(x: f32) -> f32 {
    f64::from(x).exp() as f32
}

/// `lambda = log(alpha_t) - log(sigma_t)` with the flow parameterisation of
/// `DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t` (`use_flow_sigmas`: `alpha_t = 1 - sigma`,
/// `sigma_t = sigma`), in `f32`. `lambda(0) = +inf` (the final step), which the first-order update handles.
fn dpm_alpha_lambda(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 - sigma;
    (alpha, ln_f32(alpha) - ln_f32(sigma))
}

/// One evaluation of `DPMSolverMultistepScheduler.step` (dpmsolver++, solver_order 2, midpoint, flow
/// prediction), element-wise in `f32`.
///
/// `convert_model_output`: `x0 = sample - sigma * model_output` with `sigma = sigmas[i]`; `model_outputs`
/// shifts so the previous `x0` is kept. The first step (`lower_order_nums < 1`) and the last one
/// (`lower_order_final`: `final_sigmas_type == "zero"` makes the last step first order whatever the step count)
/// use `dpm_solver_first_order_update`, the others `multistep_dpm_solver_second_order_update`.
#[allow(clippy::too_many_arguments)]
fn dpm_step(
    sigmas: &[f32],
    i: usize,
    last: bool,
    x0: &mut Vec<f32>,
    prev_x0: &mut Vec<f32>,
    lower_order_nums: &mut usize,
    model_output: &[f32],
    sample: &mut [f32],
) {
    let sigma = sigmas[i];
    // model_outputs[0] = model_outputs[1]; model_outputs[-1] = convert_model_output(...)
    std::mem::swap(x0, prev_x0);
    x0.clear();
    x0.extend(sample.iter().zip(model_output).map(|(x, v)| x - sigma * v));
    if *lower_order_nums < 1 || last {
        dpm_first_order(sigmas[i + 1], sigma, x0, sample);
    } else {
        dpm_second_order(sigmas[i + 1], sigma, sigmas[i - 1], x0, prev_x0, sample);
    }
    if *lower_order_nums < 2 {
        *lower_order_nums += 1; // capped at solver_order
    }
}

/// The scalars of [`dpm_first_order`]: `(sigma_t / sigma_s, alpha_t * (exp(-h) - 1.0))`.
fn dpm_first_order_scalars(sigma_t: f32, sigma_s: f32) -> (f32, f32) {
    let (alpha_t, lambda_t) = dpm_alpha_lambda(sigma_t);
    let (_, lambda_s) = dpm_alpha_lambda(sigma_s);
    let h = lambda_t - lambda_s;
    (sigma_t / sigma_s, alpha_t * (exp_f32(-h) - 1.0))
}

/// `dpm_solver_first_order_update`, dpmsolver++: `h = lambda_t - lambda_s`,
/// `x_t = (sigma_t / sigma_s) * sample - (alpha_t * (exp(-h) - 1.0)) * x0`. With `sigma_t = 0` (the final step)
/// `h = +inf` and this is `0 * sample + x0`.
fn dpm_first_order(sigma_t: f32, sigma_s: f32, x0: &[f32], sample: &mut [f32]) {
    let (ratio, coef) = dpm_first_order_scalars(sigma_t, sigma_s);
    for (x, d0) in sample.iter_mut().zip(x0) {
        *x = ratio * *x - coef * d0;
    }
}

/// The scalars of [`dpm_second_order`]: `(1 / r0, sigma_t / sigma_s0, coef, 0.5 * coef)`.
fn dpm_second_order_scalars(sigma_t: f32, sigma_s0: f32, sigma_s1: f32) -> (f32, f32, f32, f32) {
    let (alpha_t, lambda_t) = dpm_alpha_lambda(sigma_t);
    let (_, lambda_s0) = dpm_alpha_lambda(sigma_s0);
    let (_, lambda_s1) = dpm_alpha_lambda(sigma_s1);
    let h = lambda_t - lambda_s0;
    let h_0 = lambda_s0 - lambda_s1;
    let r0 = h_0 / h;
    let inv_r0 = 1.0 / r0; // Tensor.__rtruediv__: r0.reciprocal() * 1.0
    let ratio = sigma_t / sigma_s0;
    let coef = alpha_t * (exp_f32(-h) - 1.0);
    (inv_r0, ratio, coef, 0.5 * coef)
}

/// `multistep_dpm_solver_second_order_update`, dpmsolver++ midpoint: with `m0 = x0` (this evaluation),
/// `m1 = prev_x0`, `h = lambda_t - lambda_s0`, `h_0 = lambda_s0 - lambda_s1`, `r0 = h_0 / h`, `D0 = m0`,
/// `D1 = (1.0 / r0) * (m0 - m1)`:
/// `x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (exp(-h) - 1.0)) * D0 - 0.5 * (alpha_t * (exp(-h) - 1.0)) * D1`,
/// evaluated left to right.
fn dpm_second_order(sigma_t: f32, sigma_s0: f32, sigma_s1: f32, x0: &[f32], prev_x0: &[f32], sample: &mut [f32]) {
    let (inv_r0, ratio, coef, half_coef) = dpm_second_order_scalars(sigma_t, sigma_s0, sigma_s1);
    for ((x, m0), m1) in sample.iter_mut().zip(x0).zip(prev_x0) {
        let d1 = inv_r0 * (m0 - m1);
        *x = ratio * *x - coef * m0 - half_coef * d1;
    }
}

#[cfg(test)]
mod tests;
