//! Models from the Hugging Face Hub (feature `download`): the pipeline's side of [`crate::hub`].

use super::{Sd3Pipeline, Sd3PipelineBuilder};
use crate::error::Result;
use crate::hub::{download, DownloadOptions, HubRepo};

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
}
