//! The rectified-flow scheduler: diffusers' `FlowMatchEulerDiscreteScheduler`, as pure maths.
//!
//! A [`Schedule`] is a value (sigmas and timesteps); stepping is a free function. Nothing holds hidden step
//! state. Reference: diffusers 0.42.1 (as 0.35.2) `schedulers/scheduling_flow_match_euler_discrete.py`
//! (`__init__`, `set_timesteps`, `step`, `_time_shift_exponential`, `stretch_shift_to_terminal`) and
//! `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py` (`calculate_shift`).
//!
//! Float widths follow the reference exactly, because a sigma that is off in its last bit changes the image:
//! the training sigma range is computed in `f32` (torch), the inference grid in `f64` (numpy), and the result
//! is rounded to `f32` once.
//!
//! The other samplers (Heun, DPM-Solver++ 2M), which carry state from one model evaluation to the next, are a
//! [`Sampler`] value chosen by [`SamplerKind`]; its Euler is this module's schedule and step.

mod config;
mod samplers;

pub use config::{FlowMatchConfig, TimeShiftType};
pub(crate) use samplers::StepScalars;
pub use samplers::{Sampler, SamplerKind};

use crate::error::{Error, Result};

/// Sigmas and timesteps for one run: `timesteps[i] = sigmas[i] * num_train_timesteps`, and `sigmas` has one
/// more entry than `timesteps` (the final 0, or 1 with `invert_sigmas`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Schedule {
    /// Noise levels, `steps + 1` values, decreasing to 0.
    pub sigmas: Vec<f32>,
    /// What the transformer receives as `timestep` at each step (`sigma * num_train_timesteps`).
    pub timesteps: Vec<f32>,
}

impl Schedule {
    /// Number of denoising steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// True when there are no steps.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// Keeps the steps from `start` on (img2img starts part-way down the schedule).
    pub fn skip(&self, start: usize) -> Schedule {
        let start = start.min(self.timesteps.len());
        Schedule { sigmas: self.sigmas[start..].to_vec(), timesteps: self.timesteps[start..].to_vec() }
    }
}

/// SD3's resolution-dependent shift parameter `mu`: a line through (`base_seq_len`, `base_shift`) and
/// (`max_seq_len`, `max_shift`) evaluated at `image_seq_len` (diffusers `calculate_shift`).
pub fn calculate_shift(image_seq_len: usize, config: &FlowMatchConfig) -> f64 {
    let m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len);
    let b = config.base_shift - m * config.base_image_seq_len;
    image_seq_len as f64 * m + b
}

/// `shift * s / (1 + (shift - 1) * s)`, in `f32` as torch computes it for the training sigmas
/// (`FlowMatchEulerDiscreteScheduler.__init__`: `shift * sigmas / (1 + (shift - 1) * sigmas)` on a float32
/// tensor). `shift` and `shift - 1` are Python floats, each rounded to `f32` where it meets the tensor, so
/// `shift - 1` is taken in `f64` first: for shifts such as 2.07, `f32(shift - 1)` differs from `f32(shift) - 1`
/// and torch's `sigma_max` is then 0.9999999 (1 - 2^-23), not 1.
fn shift_f32(shift: f64, s: f32) -> f32 {
    (shift as f32) * s / (1.0 + ((shift - 1.0) as f32) * s)
}

impl FlowMatchConfig {
    /// The schedule for `steps` steps; `mu` is required when `use_dynamic_shifting` is set (see
    /// [`calculate_shift`]).
    pub fn schedule(&self, steps: usize, mu: Option<f64>) -> Result<Schedule> {
        if steps == 0 {
            return Err(Error::request("steps", steps, "at least one denoising step is needed"));
        }
        let n_train = self.num_train_timesteps as f64;
        // __init__: the training sigmas in f32; sigma_max is the first (t = 1000), sigma_min the last (t = 1).
        let (sigma_max, sigma_min) = {
            let s_max = 1.0f32; // num_train_timesteps / num_train_timesteps
            let s_min = 1.0f32 / self.num_train_timesteps as f32;
            if self.use_dynamic_shifting {
                (f64::from(s_max), f64::from(s_min))
            } else {
                (f64::from(shift_f32(self.shift, s_max)), f64::from(shift_f32(self.shift, s_min)))
            }
        };
        // set_timesteps: np.linspace(sigma_max * T, sigma_min * T, steps) / T, in f64.
        let (start, end) = (sigma_max * n_train, sigma_min * n_train);
        let mut sigmas: Vec<f64> = linspace(start, end, steps).into_iter().map(|t| t / n_train).collect();
        if self.use_dynamic_shifting {
            let mu = mu.ok_or_else(|| {
                Error::request("mu", "none", "use_dynamic_shifting is set, so mu (from the image size) is required")
            })?;
            for s in &mut sigmas {
                *s = match self.time_shift_type {
                    TimeShiftType::Exponential => mu.exp() / (mu.exp() + (1.0 / *s - 1.0)),
                    TimeShiftType::Linear => mu / (mu + (1.0 / *s - 1.0)),
                };
            }
        } else {
            let k = self.shift;
            for s in &mut sigmas {
                *s = k * *s / (1.0 + (k - 1.0) * *s);
            }
        }
        if let Some(terminal) = self.shift_terminal.filter(|t| *t != 0.0) {
            let last = *sigmas.last().unwrap_or(&0.0);
            let scale = (1.0 - last) / (1.0 - terminal);
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let t_scale = self.num_train_timesteps as f32;
        let (timesteps, last) = if self.invert_sigmas {
            for s in &mut sigmas {
                *s = 1.0 - *s;
            }
            (sigmas.iter().map(|s| s * t_scale).collect(), 1.0)
        } else {
            (sigmas.iter().map(|s| s * t_scale).collect(), 0.0)
        };
        sigmas.push(last);
        Ok(Schedule { sigmas, timesteps })
    }
}

/// numpy's `linspace(start, stop, num)` (endpoint included), bit for bit: `start + i * step` with the last
/// value set to `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// One Euler step of the flow ODE, in place: `x += (sigma_next - sigma) * v` (all `f32`, as diffusers' `step`).
pub fn euler_step(sample: &mut [f32], velocity: &[f32], sigma: f32, sigma_next: f32) {
    let dt = sigma_next - sigma;
    for (x, v) in sample.iter_mut().zip(velocity) {
        *x += dt * v;
    }
}

/// Classifier-free guidance in place on the conditional half: `v = v_u + g * (v_c - v_u)`, in `f32`
/// (diffusers `StableDiffusion3Pipeline.__call__`).
pub fn apply_guidance(cond: &mut [f32], uncond: &[f32], guidance: f32) {
    for (c, u) in cond.iter_mut().zip(uncond) {
        *c = u + guidance * (*c - u);
    }
}

#[cfg(test)]
mod tests;
