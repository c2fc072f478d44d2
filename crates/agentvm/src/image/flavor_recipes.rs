//! The recipes of a flavor: its base image and its agent layer.

use super::{LayerRecipe, Recipe};
use crate::config::flavor::Flavor;
use crate::guest_env::cri;

/// The base image for a flavor: the shared base, plus the flavor's Debian
/// packages if it has any, plus every container runtime's when `cri` (one
/// image for any choice of runtimes; the guest starts only those asked for).
pub fn base_recipe(flavor: &Flavor, cri: bool) -> Recipe {
    let mut recipe = Recipe::base();
    if !flavor.apt.is_empty() {
        let apt: Vec<&str> = flavor.apt.iter().map(String::as_str).collect();
        recipe = recipe.with_layer(&format!("base-{}", flavor.name), &apt);
    }
    if cri {
        recipe = recipe.with_layer(&format!("{}+cri", recipe.name), &cri::all_packages());
    }
    recipe
}

/// The npm layer of a flavor, if it has npm packages.
pub fn layer_recipe(flavor: &Flavor) -> Option<LayerRecipe> {
    let npm = flavor.npm_specs();
    (!npm.is_empty()).then(|| LayerRecipe { name: flavor.name.clone(), npm })
}
