//! What the project's `.gitignore` files (and `.git/info/exclude`) ignore,
//! plus `.git` itself: never watched, never told.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

/// The matchers of the directories that have a `.gitignore`, by their
/// path relative to the project.
#[derive(Debug)]
pub struct Ignores {
    root: PathBuf,
    by_dir: HashMap<Vec<u8>, Gitignore>,
}

impl Ignores {
    pub fn new(root: &Path) -> Ignores {
        let mut ignores = Ignores { root: root.to_path_buf(), by_dir: HashMap::new() };
        ignores.load(b"");
        ignores
    }

    /// Reads (again) the `.gitignore` of the directory `dir` (relative; the
    /// root's also takes `.git/info/exclude`). A file that does not parse
    /// ignores what of it does.
    pub fn load(&mut self, dir: &[u8]) {
        let abs = self.abs(dir);
        let mut builder = GitignoreBuilder::new(&abs);
        builder.add(abs.join(".gitignore"));
        if dir.is_empty() {
            builder.add(abs.join(".git/info/exclude"));
        }
        match builder.build() {
            Ok(gi) if !gi.is_empty() => {
                self.by_dir.insert(dir.to_vec(), gi);
            }
            _ => {
                self.by_dir.remove(dir);
            }
        }
    }

    /// Whether `rel` (relative to the project) is `.git`, in it, or ignored
    /// by the nearest `.gitignore` that says anything about it.
    pub fn is_ignored(&self, rel: &[u8], is_dir: bool) -> bool {
        if rel.split(|b| *b == b'/').any(|c| c == b".git") {
            return true;
        }
        let abs = self.abs(rel);
        let mut dir = rel;
        while let Some(cut) = dir.iter().rposition(|b| *b == b'/').or((!dir.is_empty()).then_some(0)) {
            dir = &dir[..cut];
            if let Some(gi) = self.by_dir.get(dir) {
                match gi.matched(&abs, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
        }
        false
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_gitignores_negations_and_dot_git() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub/deep")).unwrap();
        std::fs::create_dir_all(d.path().join(".git/info")).unwrap();
        std::fs::write(d.path().join(".gitignore"), "target/\n*.log\n").unwrap();
        std::fs::write(d.path().join(".git/info/exclude"), "secret.txt\n").unwrap();
        std::fs::write(d.path().join("sub/.gitignore"), "!keep.log\nlocal\n").unwrap();
        let mut ig = Ignores::new(d.path());
        ig.load(b"sub");
        let ignored = |p: &str, dir| ig.is_ignored(p.as_bytes(), dir);
        assert!(ignored("target", true) && ignored("a.log", false) && ignored("sub/deep/x.log", false));
        assert!(!ignored("target", false), "target/ names directories only");
        assert!(ignored("secret.txt", false), ".git/info/exclude counts");
        assert!(!ignored("sub/keep.log", false), "a nearer negation wins");
        assert!(ignored("sub/local", false) && !ignored("local", false));
        assert!(ignored(".git", true) && ignored(".git/HEAD", false) && ignored("sub/.git/x", false));
        assert!(!ignored("src/main.rs", false) && !ignored(".gitignore", false));
    }
}
