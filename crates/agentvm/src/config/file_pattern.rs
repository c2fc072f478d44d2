//! `devshell_files` entries: the project files a dev shell reads besides
//! the Nix files, trusted and cached with them ([`crate::config::trust`]).

/// A `devshell_files` entry: a project file the dev shell reads besides
/// the Nix files (`rust-toolchain.toml`), or with a `*` in its last
/// component, the matching files of one directory (`nix/data/*.json`).
/// A path relative to the project, without `.`, `..` or empty components,
/// and nothing in `.git`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct FilePattern {
    /// As written.
    text: String,
    /// The directories leading to the file, each a plain name.
    pub(super) dirs: Vec<String>,
    /// The file's name, or a pattern in which `*` stands for any run of
    /// characters (not a leading `.`, as in the shell).
    pub(super) name: String,
}

/// Longest `devshell_files` entry accepted.
const PATTERN_LIMIT: usize = 4096;

/// A `devshell_files` entry that names no project file. The entry itself
/// is not repeated: a config's content never reaches an error (the place
/// does, see [`crate::config::toml_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a devshell_files entry {0}: name a file by its path in the project, e.g. \"rust-toolchain.toml\" or \"nix/data/*.json\" (a `*` only in the last component)")]
pub struct FilePatternError(&'static str);

impl TryFrom<String> for FilePattern {
    type Error = FilePatternError;

    fn try_from(text: String) -> Result<FilePattern, FilePatternError> {
        if text.is_empty() || text.len() > PATTERN_LIMIT || text.contains('\0') {
            return Err(FilePatternError("is empty, too long or holds a NUL"));
        }
        if text.starts_with('/') {
            return Err(FilePatternError("is an absolute path"));
        }
        let mut parts: Vec<String> = text.split('/').map(String::from).collect();
        let name = parts.pop().expect("split yields one part at least");
        for part in parts.iter().chain([&name]) {
            match part.as_str() {
                "" => return Err(FilePatternError("has an empty component (a doubled or trailing `/`)")),
                "." | ".." => return Err(FilePatternError("has a `.` or `..` component")),
                ".git" => return Err(FilePatternError("is in .git, which is git's and never a dev shell source")),
                _ => {}
            }
        }
        if parts.iter().any(|p| p.contains('*')) {
            return Err(FilePatternError("has a `*` before its last component"));
        }
        Ok(FilePattern { text, dirs: parts, name })
    }
}

impl std::fmt::Display for FilePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl FilePattern {
    /// Whether the pattern names the file at `rel` (a path in the project).
    pub fn matches(&self, rel: &str) -> bool {
        let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        dir.split('/').filter(|d| !d.is_empty()).eq(self.dirs.iter().map(String::as_str)) && self.matches_name(name)
    }

    /// Whether the last component matches the file name `name`.
    pub(super) fn matches_name(&self, name: &str) -> bool {
        if !self.name.contains('*') {
            return name == self.name;
        }
        if name.starts_with('.') && !self.name.starts_with('.') {
            return false;
        }
        let mut pieces = self.name.split('*');
        let first = pieces.next().expect("split yields one piece at least");
        let Some(mut rest) = name.strip_prefix(first) else { return false };
        let mut pieces: Vec<&str> = pieces.collect();
        let last = pieces.pop().expect("the name has a `*`");
        for piece in pieces {
            match rest.find(piece) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Vec<FilePattern> {
        list.iter().map(|p| FilePattern::try_from(p.to_string()).unwrap()).collect()
    }

    #[test]
    fn devshell_files_entries_are_plain_project_paths_with_a_star_at_most_in_the_last_component() {
        for good in ["rust-toolchain.toml", "nix/data/*.json", "a/b/c", "*", ".python-version", "pyproject.*"] {
            assert!(FilePattern::try_from(good.to_string()).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../secret", "`..`"),
            ("a/../../b", "`..`"),
            ("./Cargo.lock", "`.`"),
            ("a//b", "empty component"),
            ("dir/", "empty component"),
            (".git/config", ".git"),
            ("vendor/.git/hooks/x", ".git"),
            ("*/data.json", "`*` before"),
            ("a\0b", "NUL"),
        ] {
            let e = FilePattern::try_from(bad.to_string()).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("rust-toolchain.toml"), "{bad:?}: {e}");
        }
        let star = &patterns(&["nix/data/*.json", "*", "a*b*c"]);
        assert!(star[0].matches("nix/data/x.json") && !star[0].matches("nix/data/.x.json"));
        assert!(
            !star[0].matches("nix/data/x.json.bak")
                && !star[0].matches("nix/x.json")
                && !star[0].matches("nix/data/sub/x.json")
        );
        assert!(star[1].matches("README") && !star[1].matches(".hidden") && !star[1].matches("a/README"));
        assert!(
            star[2].matches("abc") && star[2].matches("a-b-c") && !star[2].matches("acb") && !star[2].matches("ab")
        );
    }
}
