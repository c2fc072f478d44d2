//! What runs in the guest: the flavor, its argv and environment, the dev
//! shell applied to it.

use std::collections::BTreeMap;

use crate::config::envvars::{self, GuestEnv};
use crate::config::file_pattern::FilePattern;
use crate::config::flavor::{self, Flavor, FlavorError, DEFAULT_FLAVOR};
use crate::config::options::Layers;
use crate::config::SettingsError;
use crate::guest_env::devshell;

/// The program of one launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub flavor: Flavor,
    /// The flavor's command and the user's arguments; empty: a login shell.
    pub argv: Vec<String>,
    pub guest_env: GuestEnv,
    pub devshell: devshell::Mode,
    pub devshell_files: Vec<FilePattern>,
}

/// The program, with the host environment `get_env` (for the flavor's
/// keys and `-e NAME`).
pub fn resolve(layers: &Layers, get_env: &dyn Fn(&str) -> Option<String>) -> Result<Program, SettingsError> {
    let name = layers.value(|o| &o.flavor);
    let flavor = flavor::resolve(&flavors(layers)?, name.as_deref().unwrap_or(DEFAULT_FLAVOR))?;
    let guest_env = envvars::build(flavor.vars(), &layers.list(|o| &o.env), &layers.list(|o| &o.env_files), get_env)?;
    Ok(Program {
        argv: flavor.argv(&layers.list(|o| &o.args)),
        flavor,
        guest_env,
        devshell: layers.value(|o| &o.devshell).unwrap_or_default(),
        devshell_files: layers.list(|o| &o.devshell_files),
    })
}

/// Every flavor: the built-in ones, changed and added to by each layer's
/// `[flavors.NAME]` tables in turn.
pub fn flavors(layers: &Layers) -> Result<BTreeMap<String, Flavor>, FlavorError> {
    layers.iter().try_fold(flavor::builtin_flavors(), |all, layer| flavor::merge(all, &layer.flavors))
}
