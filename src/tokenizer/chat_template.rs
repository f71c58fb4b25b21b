//! Chat templates: Hugging Face Jinja templates rendered with minijinja.

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
}

impl ChatTemplate {
    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }
}
