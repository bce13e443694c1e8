//! Models from the Hugging Face Hub (feature `download`): the pipeline's side of [`crate::hub`].

use super::{Sd3Pipeline, Sd3PipelineBuilder};
use crate::controlnet::ControlNetInfo;
use crate::error::Result;
use crate::hub::{download, download_controlnet, DownloadOptions, HubRepo};

impl Sd3Pipeline {
    /// Downloads `repo` (`org/name` or `org/name@revision`) from the Hugging Face Hub into the cache, with the
    /// settings of the environment (see [`hub`](crate::hub)), and returns a builder for the snapshot. Needs the
    /// `download` feature.
    ///
    /// ```no_run
    /// # fn main() -> sd3_onnx::Result<()> {
    /// let mut pipe = sd3_onnx::Sd3Pipeline::from_hub("org/sd3-medium-onnx@main")?.build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_hub(repo: &str) -> Result<Sd3PipelineBuilder> {
        Sd3Pipeline::from_hub_with(&HubRepo::parse(repo)?, &DownloadOptions::new())
    }

    /// [`Sd3Pipeline::from_hub`] with options. Without T5 in the options, the builder is set to no-T5 mode too
    /// (the snapshot folder may hold T5 from an earlier download).
    pub fn from_hub_with(repo: &HubRepo, options: &DownloadOptions) -> Result<Sd3PipelineBuilder> {
        let snapshot = download(repo, options)?;
        let builder = Sd3Pipeline::builder(snapshot.dir);
        Ok(builder.t5(options.t5))
    }

    /// Downloads the ControlNet repository `repo` (`org/name` or `org/name@revision`: an ONNX ControlNet folder,
    /// docs/controlnet.md) into the cache with the settings of the environment and loads it under `name`, as
    /// [`Sd3Pipeline::load_controlnet`] does. The model needs `transformer/model_controlnet.onnx`
    /// ([`DownloadOptions::controlnet_graph`] fetches it with the model). Needs the `download` feature.
    ///
    /// ```no_run
    /// # fn main() -> sd3_onnx::Result<()> {
    /// use sd3_onnx::hub::{DownloadOptions, HubRepo};
    /// let options = DownloadOptions::new().controlnet_graph(true);
    /// let mut pipe = sd3_onnx::Sd3Pipeline::from_hub_with(&HubRepo::parse("org/sd3-medium-onnx")?, &options)?.build()?;
    /// pipe.load_controlnet_from_hub("canny", "org/sd3-canny-onnx")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn load_controlnet_from_hub(&mut self, name: impl Into<String>, repo: &str) -> Result<ControlNetInfo> {
        self.load_controlnet_from_hub_with(name, &HubRepo::parse(repo)?, &DownloadOptions::new())
    }

    /// [`Sd3Pipeline::load_controlnet_from_hub`] with options (endpoint, cache, token, progress; the model-folder
    /// choices do not apply).
    pub fn load_controlnet_from_hub_with(
        &mut self,
        name: impl Into<String>,
        repo: &HubRepo,
        options: &DownloadOptions,
    ) -> Result<ControlNetInfo> {
        let snapshot = download_controlnet(repo, options)?;
        self.load_controlnet(name, snapshot.dir)
    }
}
