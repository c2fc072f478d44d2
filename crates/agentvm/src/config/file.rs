//! The config files, each a layer of [`RunOptions`]: the user's
//! (`~/.config/agentvm/config.toml`) and the project's (`.agentvm.toml`,
//! used only when trusted, see [`crate::config::trust`]).

use std::path::{Path, PathBuf};

use crate::config::flavor::{self, FlavorError};
use crate::config::options::RunOptions;
use crate::config::toml_error::{self, TomlError};

/// The project config file's name, in the work dir.
pub const PROJECT_CONFIG: &str = ".agentvm.toml";

/// A config file that cannot be used. Never holds the file's content.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is invalid: not UTF-8 text")]
    NotUtf8 { path: PathBuf },
    #[error("config {path} is invalid: {source}")]
    Parse { path: PathBuf, source: TomlError },
    #[error(transparent)]
    Flavor(#[from] FlavorError),
}

/// Reads the config file at `path`; a missing file is an empty layer.
pub fn read_layer(path: &Path) -> Result<RunOptions, ConfigFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_layer(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunOptions::default()),
        Err(source) => Err(ConfigFileError::Read { path: path.into(), source }),
    }
}

/// Parses the bytes of the config file at `path`.
pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<RunOptions, ConfigFileError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ConfigFileError::NotUtf8 { path: path.into() })?;
    parse_layer(text, path)
}

/// Parses the text of the config file at `path`. A relative `home` is
/// taken relative to the file's directory.
pub fn parse_layer(text: &str, path: &Path) -> Result<RunOptions, ConfigFileError> {
    let mut layer: RunOptions =
        toml_error::from_str(text).map_err(|source| ConfigFileError::Parse { path: path.into(), source })?;
    flavor::check_tables(&layer.flavors, path)?;
    if let (Some(home), Some(dir)) = (&layer.home, path.parent()) {
        layer.home = Some(dir.join(home));
    }
    Ok(layer)
}
