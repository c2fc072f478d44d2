//! A sandbox's name: one component of a git ref (its branch on the host
//! is `agentvm/NAME`) and of a path (its directory), so only a safe subset.

use std::fmt;

/// The longest name accepted.
const MAX_LEN: usize = 64;

/// A checked sandbox name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SandboxName(String);

/// A name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sandbox name {0:?} is not allowed: use 1 to {MAX_LEN} letters, digits, '.', '_' or '-', not starting \
     with '.' or '-', without '..' and not ending in '.' or '.lock' (it names the branch agentvm/NAME)"
)]
pub struct NameError(pub String);

impl SandboxName {
    /// `name` if it is a safe git ref component and file name.
    pub fn parse(name: &str) -> Result<SandboxName, NameError> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let ok = !name.is_empty()
            && name.len() <= MAX_LEN
            && name.chars().all(allowed)
            && !name.starts_with(['.', '-'])
            && !name.ends_with('.')
            && !name.ends_with(".lock")
            && !name.contains("..");
        if ok {
            Ok(SandboxName(name.to_string()))
        } else {
            Err(NameError(name.to_string()))
        }
    }

    /// A new short name (six hex digits) that `taken` does not know.
    pub fn generate(taken: impl Fn(&SandboxName) -> bool) -> SandboxName {
        loop {
            let mut b = [0u8; 3];
            crate::sys::random_bytes(&mut b).expect("getrandom failed");
            let name = SandboxName(b.iter().map(|x| format!("{x:02x}")).collect());
            if !taken(&name) {
                return name;
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its branch on the host, `agentvm/NAME`.
    pub fn branch(&self) -> String {
        format!("agentvm/{}", self.0)
    }

    /// Its branch's full ref, `refs/heads/agentvm/NAME`.
    pub fn branch_ref(&self) -> String {
        format!("refs/heads/agentvm/{}", self.0)
    }
}

impl fmt::Display for SandboxName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ref_components_are_names() {
        for ok in ["fix-1", "a", "Feature_2.x", "0abc", &"x".repeat(64)] {
            assert_eq!(SandboxName::parse(ok).unwrap().as_str(), ok);
        }
        assert_eq!(SandboxName::parse("fix-1").unwrap().branch_ref(), "refs/heads/agentvm/fix-1");
    }

    #[test]
    fn names_git_or_a_path_would_misread_are_refused_with_the_name() {
        for bad in [
            "",
            ".hidden",
            "-flag",
            "a..b",
            "end.",
            "x.lock",
            "a/b",
            "a b",
            "a:b",
            "a~1",
            "a^",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "a@{0}",
            "é",
            "tab\t",
            &"x".repeat(65),
        ] {
            let e = SandboxName::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn generated_names_are_valid_and_avoid_taken_ones() {
        let first = SandboxName::generate(|_| false);
        assert_eq!(SandboxName::parse(first.as_str()).unwrap(), first);
        assert_eq!(first.as_str().len(), 6);
        let other = SandboxName::generate(|n| *n == first);
        assert_ne!(other, first);
    }
}
