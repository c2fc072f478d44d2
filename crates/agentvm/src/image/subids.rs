//! Subordinate ids: a normal user builds images with `mmdebstrap
//! --mode=unshare`, which maps [`NEEDED`] ids from the user's ranges in
//! `/etc/subuid` and `/etc/subgid`. `agentvm doctor` checks the same
//! requirement as the build, so it cannot pass where the build then fails.

use std::fmt;

/// How many subordinate ids one range must hold: mmdebstrap maps 65536.
pub const NEEDED: u64 = 65536;

/// The files that grant subordinate user and group ids.
const FILES: [&str; 2] = ["/etc/subuid", "/etc/subgid"];

/// What a user's subordinate ids lack for an image build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// The user name (or uid when it has no name).
    pub user: String,
    /// `/etc/subuid` or `/etc/subgid`.
    pub file: &'static str,
    /// The largest range the file grants the user, if any.
    pub largest: Option<u64>,
}

impl Shortfall {
    /// The command that grants the ids.
    pub fn fix(&self) -> String {
        let (first, last) = (100_000, 100_000 + NEEDED - 1);
        format!("sudo usermod --add-subuids {first}-{last} --add-subgids {first}-{last} {}", self.user)
    }
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.largest {
            None => write!(f, "user {} has no range in {}", self.user, self.file),
            Some(n) => write!(f, "the largest range of user {} in {} has {n} ids", self.user, self.file),
        }?;
        write!(f, "; building an image as a normal user needs a range of at least {NEEDED}")
    }
}

/// Checks that `user` (or `uid`) has a range of at least [`NEEDED`] ids in
/// both files.
pub fn check(user: Option<&str>, uid: u32) -> Result<(), Shortfall> {
    for file in FILES {
        let largest = largest_range(&std::fs::read_to_string(file).unwrap_or_default(), user, uid);
        if largest.is_none_or(|n| n < NEEDED) {
            let user = user.map_or_else(|| uid.to_string(), str::to_string);
            return Err(Shortfall { user, file, largest });
        }
    }
    Ok(())
}

/// The size of the largest range `text` (in `/etc/subuid`'s format,
/// `name-or-uid:first:count`) grants `user` or `uid`.
pub fn largest_range(text: &str, user: Option<&str>, uid: u32) -> Option<u64> {
    let uid = uid.to_string();
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, _first, count) = (f.next()?, f.next()?, f.next()?);
            (Some(who) == user || who == uid).then(|| count.parse::<u64>().ok()).flatten()
        })
        .max()
}

/// The login name of `uid` from `/etc/passwd` (no NSS in a static
/// binary), else `$USER`.
pub fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid.to_string()).then(|| name.to_string())
        })
        .or_else(|| std::env::var("USER").ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_by_name_or_uid_and_the_largest_counts() {
        let text = "alice:100000:65536\n1002:200000:65536\nbob:300000:1000\nbob:400000:2000\nbad:line\n";
        assert_eq!(largest_range(text, Some("alice"), 1001), Some(65536));
        assert_eq!(largest_range(text, None, 1002), Some(65536));
        assert_eq!(largest_range(text, Some("bob"), 1003), Some(2000));
        assert_eq!(largest_range(text, Some("carol"), 1004), None);
        assert_eq!(largest_range("", Some("alice"), 1001), None);
    }

    #[test]
    fn a_shortfall_says_what_is_needed_and_how_to_get_it() {
        let none = Shortfall { user: "carol".into(), file: "/etc/subuid", largest: None };
        assert_eq!(
            none.to_string(),
            "user carol has no range in /etc/subuid; building an image as a normal user needs a range of at least 65536"
        );
        let small = Shortfall { largest: Some(1000), ..none.clone() };
        assert!(small.to_string().starts_with("the largest range of user carol in /etc/subuid has 1000 ids;"));
        assert_eq!(none.fix(), "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 carol");
    }

    #[test]
    fn root_is_found_in_passwd() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
