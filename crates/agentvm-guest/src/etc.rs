//! Edits of the root's /etc: the user account, sudo, hostname and hosts.
//!
//! The text transformations are pure functions (unit-tested); `setup_user`
//! and `setup_hostname` apply them to the files.

use crate::error::{Error, IoContext, Result};
use agentvm_proto::{CaTrust, User};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// The group whose members get `sudo` rights on Debian.
const SUDO_GROUP: &str = "sudo";

/// `content` without the entries named `name` or whose numeric field
/// `id_field` equals `id`, with `new_line` appended.
pub fn replace_entry(content: &str, name: &str, id: Option<(usize, u32)>, new_line: &str) -> String {
    let mut out = String::with_capacity(content.len() + new_line.len() + 1);
    for line in content.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let same_name = fields[0] == name;
        let same_id = id.is_some_and(|(i, id)| fields.get(i).and_then(|f| f.parse::<u32>().ok()) == Some(id));
        if !line.is_empty() && !same_name && !same_id {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(new_line);
    out.push('\n');
    out
}

/// `content` (an /etc/group or /etc/gshadow) with `user` added to the member
/// list of `group` (the last field), if that group exists and lacks it.
pub fn add_member(content: &str, group: &str, user: &str) -> String {
    let mut out = String::with_capacity(content.len() + user.len() + 2);
    for line in content.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields[0] == group && fields.len() >= 4 {
            let last = fields.len() - 1;
            let mut members: Vec<&str> = fields[last].split(',').filter(|m| !m.is_empty()).collect();
            if !members.contains(&user) {
                members.push(user);
            }
            let joined = members.join(",");
            fields[last] = &joined;
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The gids of the groups in `group_content` that list `user` as a member.
pub fn supplementary_gids(group_content: &str, user: &str) -> Vec<u32> {
    group_content
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let gid = f.get(2)?.parse().ok()?;
            f.get(3)?.split(',').any(|m| m == user).then_some(gid)
        })
        .collect()
}

/// /etc/hosts content with `127.0.1.1 <hostname>` as the only 127.0.1.1 line
/// and a localhost line if there was none.
pub fn hosts_with_hostname(content: &str, hostname: &str) -> String {
    let mut out = String::new();
    let has_localhost = content.lines().any(|l| l.split_whitespace().next() == Some("127.0.0.1"));
    if !has_localhost {
        out.push_str("127.0.0.1\tlocalhost\n");
    }
    for line in content.lines() {
        if line.split_whitespace().next() != Some("127.0.1.1") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    out
}

/// /etc/hosts content with `name` resolving to `addr` only.
pub fn hosts_with_alias(content: &str, name: &str, addr: std::net::Ipv4Addr) -> String {
    let mut out = String::new();
    for line in content.lines() {
        if !line.split_whitespace().skip(1).any(|n| n == name) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("{addr}\t{name}\n"));
    out
}

/// Adds `user` to `group` in the root's /etc/group (if the group exists).
pub fn add_to_group(root: &Path, group: &str, user: &str) -> Result<()> {
    edit_file(&root.join("etc/group"), 0o644, |c| add_member(c, group, user))
}

/// `certs` (PEM) as the text of one file.
fn pem_text(certs: &[String]) -> String {
    certs.iter().map(|c| format!("{}\n", c.trim_end())).collect()
}

/// Installs the launch's trust store, built on the host: the system
/// bundle becomes `trust.bundle` (the host's public roots) and
/// `trust.extra` when the host sent a bundle, else the image's bundle gets
/// `trust.extra` appended; `trust.extra` also gets a file of its own (Node
/// reads it, on top of its own roots). Nothing to do for an empty one.
pub fn install_trust(root: &Path, trust: &CaTrust) -> Result<()> {
    if trust.is_empty() {
        return Ok(());
    }
    let extra = pem_text(&trust.extra);
    let bundle = root.join(agentvm_proto::spec::SYSTEM_BUNDLE.trim_start_matches('/'));
    if trust.bundle.is_empty() {
        edit_file(&bundle, 0o644, |c| {
            format!("{c}{}{extra}", if c.is_empty() || c.ends_with('\n') { "" } else { "\n" })
        })?;
    } else {
        edit_file(&bundle, 0o644, |_| pem_text(&trust.bundle) + &extra)?;
    }
    if !extra.is_empty() {
        let path = root.join(agentvm_proto::spec::EXTRA_CA_PATH.trim_start_matches('/'));
        fs::write(&path, &extra).ctx("write", &path)?;
    }
    Ok(())
}

/// Makes `name` resolve to `addr` in the root's /etc/hosts.
pub fn add_host_alias(root: &Path, name: &str, addr: std::net::Ipv4Addr) -> Result<()> {
    edit_file(&root.join("etc/hosts"), 0o644, |c| hosts_with_alias(c, name, addr))
}

/// Checks that a name can go into the colon-separated account files.
fn check_field(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.contains([':', '\n', ',']) {
        return Err(Error::BadSpec(format!("{what} {value:?} is empty or contains ':', ',' or a newline")));
    }
    Ok(())
}

fn read_or_empty(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Applies `edit` to the file at `path` (missing: empty), creating it with
/// `mode` if it did not exist. An existing file keeps its mode and owner.
fn edit_file(path: &Path, mode: u32, edit: impl FnOnce(&str) -> String) -> Result<()> {
    let existed = path.exists();
    let new = edit(&read_or_empty(path)?);
    fs::write(path, new).ctx("write", path)?;
    if !existed {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx("set the mode of", path)?;
    }
    Ok(())
}

/// Adds `user` to /etc/passwd, /etc/group, /etc/shadow, /etc/gshadow and the
/// sudo group, gives it passwordless sudo, and creates its home if missing.
pub fn setup_user(root: &Path, user: &User) -> Result<()> {
    check_field("user name", &user.name)?;
    check_field("home directory", &user.home)?;
    let etc = root.join("etc");
    let passwd = format!("{}:x:{}:{}::{}:/bin/bash", user.name, user.uid, user.gid, user.home);
    edit_file(&etc.join("passwd"), 0o644, |c| replace_entry(c, &user.name, Some((2, user.uid)), &passwd))?;
    let shadow = format!("{}:*::0:99999:7:::", user.name);
    edit_file(&etc.join("shadow"), 0o600, |c| replace_entry(c, &user.name, None, &shadow))?;
    let group = format!("{}:x:{}:", user.name, user.gid);
    edit_file(&etc.join("group"), 0o644, |c| {
        add_member(&replace_entry(c, &user.name, Some((2, user.gid)), &group), SUDO_GROUP, &user.name)
    })?;
    let gshadow_path = etc.join("gshadow");
    if gshadow_path.exists() {
        let gshadow = format!("{}:!::", user.name);
        edit_file(&gshadow_path, 0o600, |c| {
            add_member(&replace_entry(c, &user.name, None, &gshadow), SUDO_GROUP, &user.name)
        })?;
    }

    let sudoers_d = etc.join("sudoers.d");
    fs::DirBuilder::new().recursive(true).mode(0o750).create(&sudoers_d).ctx("create directory", &sudoers_d)?;
    let sudoers = sudoers_d.join("agentvm");
    fs::write(&sudoers, format!("{} ALL=(ALL:ALL) NOPASSWD: ALL\n", user.name)).ctx("write", &sudoers)?;
    fs::set_permissions(&sudoers, fs::Permissions::from_mode(0o440)).ctx("set the mode of", &sudoers)?;

    let home = root.join(user.home.trim_start_matches('/'));
    if !home.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(&home).ctx("create home directory", &home)?;
        crate::sys::chown(&home, user.uid, user.gid).ctx("chown", &home)?;
    }
    Ok(())
}

/// The gids the program runs with: the user's primary group first, then the
/// groups /etc/group lists it in.
pub fn user_groups(root: &Path, user: &User) -> Result<Vec<u32>> {
    let path = root.join("etc/group");
    let content = read_or_empty(&path)?;
    let mut gids = vec![user.gid];
    for g in supplementary_gids(&content, &user.name) {
        if !gids.contains(&g) {
            gids.push(g);
        }
    }
    Ok(gids)
}

/// Where a login shell gets the launch's PATH back: Debian's /etc/profile
/// resets PATH, then sources /etc/profile.d/*.sh.
const PROFILE_PATH_SCRIPT: &str = "etc/profile.d/zz-agentvm-path.sh";

/// A profile script that sets PATH to `path` (single-quoted for sh).
pub fn profile_path_script(path: &str) -> String {
    format!(
        "# Written by agentvm at boot: the launch's PATH (e.g. a dev shell's) for login shells.\nPATH='{}'\nexport PATH\n",
        path.replace('\'', "'\\''")
    )
}

/// If the launch sets PATH (e.g. from a dev shell), makes login shells
/// keep it instead of /etc/profile's default.
pub fn setup_login_path(root: &Path, env: &[(String, String)]) -> Result<()> {
    let Some((_, path)) = env.iter().rev().find(|(k, _)| k == "PATH") else {
        return Ok(());
    };
    let script = root.join(PROFILE_PATH_SCRIPT);
    if let Some(dir) = script.parent() {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).ctx("create directory", dir)?;
    }
    fs::write(&script, profile_path_script(path)).ctx("write", &script)
}

/// Sets the kernel hostname and writes /etc/hostname and /etc/hosts.
pub fn setup_hostname(root: &Path, hostname: &str) -> Result<()> {
    if hostname.is_empty() || hostname.len() > 64 || hostname.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(Error::BadSpec(format!("hostname {hostname:?} is not a valid host name")));
    }
    crate::sys::sethostname(hostname).map_err(|e| Error::sys(format!("sethostname({hostname})"), e))?;
    let path = root.join("etc/hostname");
    fs::write(&path, format!("{hostname}\n")).ctx("write", &path)?;
    edit_file(&root.join("etc/hosts"), 0o644, |c| hosts_with_hostname(c, hostname))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with the image's bundle holding `OLD` (no final newline).
    fn root_with_bundle() -> (tempfile::TempDir, std::path::PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let certs = root.path().join("etc/ssl/certs");
        fs::create_dir_all(&certs).unwrap();
        fs::write(certs.join("ca-certificates.crt"), "OLD").unwrap();
        (root, certs)
    }

    #[test]
    fn extra_cas_alone_join_the_images_bundle_and_get_a_file() {
        let (root, certs) = root_with_bundle();
        install_trust(root.path(), &CaTrust { bundle: Vec::new(), extra: vec!["NEW-CA\n".into()] }).unwrap();
        assert_eq!(fs::read_to_string(certs.join("ca-certificates.crt")).unwrap(), "OLD\nNEW-CA\n");
        assert_eq!(fs::read_to_string(certs.join("agentvm-extra-cas.pem")).unwrap(), "NEW-CA\n");
    }

    #[test]
    fn a_host_bundle_replaces_the_images_with_the_extras_after_it() {
        let (root, certs) = root_with_bundle();
        let trust = CaTrust { bundle: vec!["PUBLIC-1".into(), "PUBLIC-2\n".into()], extra: vec!["COMPANY".into()] };
        install_trust(root.path(), &trust).unwrap();
        assert_eq!(fs::read_to_string(certs.join("ca-certificates.crt")).unwrap(), "PUBLIC-1\nPUBLIC-2\nCOMPANY\n");
        assert_eq!(fs::read_to_string(certs.join("agentvm-extra-cas.pem")).unwrap(), "COMPANY\n");
    }

    #[test]
    fn an_empty_trust_store_leaves_the_images_bundle_alone() {
        let (root, certs) = root_with_bundle();
        install_trust(root.path(), &CaTrust::default()).unwrap();
        let bundle_only = CaTrust { bundle: vec!["PUBLIC".into()], extra: Vec::new() };
        assert_eq!(fs::read_to_string(certs.join("ca-certificates.crt")).unwrap(), "OLD");
        install_trust(root.path(), &bundle_only).unwrap();
        assert_eq!(fs::read_to_string(certs.join("ca-certificates.crt")).unwrap(), "PUBLIC\n");
        assert!(!certs.join("agentvm-extra-cas.pem").exists(), "no extras, no file");
    }

    #[test]
    fn host_alias_replaces_earlier_entries_for_the_name_only() {
        let before = "127.0.0.1\tlocalhost\n10.9.9.9 host.agentvm.internal\n10.0.0.1 other\n";
        let after = hosts_with_alias(before, "host.agentvm.internal", std::net::Ipv4Addr::new(127, 0, 2, 2));
        assert_eq!(after, "127.0.0.1\tlocalhost\n10.0.0.1 other\n127.0.2.2\thost.agentvm.internal\n");
    }

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nold:x:1000:1000::/home/old:/bin/sh\nagent:x:1001:1001::/x:/bin/sh\n";

    #[test]
    fn replace_entry_removes_same_name_and_same_uid() {
        let out = replace_entry(PASSWD, "agent", Some((2, 1000)), "agent:x:1000:1000::/home/agent:/bin/bash");
        assert_eq!(out, "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1000::/home/agent:/bin/bash\n");
    }

    #[test]
    fn replace_entry_on_empty_file_adds_the_line() {
        assert_eq!(replace_entry("", "a", None, "a:*::0:99999:7:::"), "a:*::0:99999:7:::\n");
    }

    #[test]
    fn replace_entry_without_id_keeps_other_names() {
        let out = replace_entry("x:*:1\ny:*:2\n", "y", None, "y:!");
        assert_eq!(out, "x:*:1\ny:!\n");
    }

    #[test]
    fn add_member_appends_to_existing_members() {
        let out = add_member("root:x:0:\nsudo:x:27:bob\n", "sudo", "agent");
        assert_eq!(out, "root:x:0:\nsudo:x:27:bob,agent\n");
    }

    #[test]
    fn add_member_to_empty_group_and_twice_is_idempotent() {
        let once = add_member("sudo:x:27:\n", "sudo", "agent");
        assert_eq!(once, "sudo:x:27:agent\n");
        assert_eq!(add_member(&once, "sudo", "agent"), once);
    }

    #[test]
    fn add_member_without_the_group_changes_nothing() {
        assert_eq!(add_member("root:x:0:\n", "sudo", "agent"), "root:x:0:\n");
    }

    #[test]
    fn supplementary_gids_lists_groups_naming_the_user() {
        let g = "root:x:0:\nsudo:x:27:bob,agent\nvideo:x:44:agentx\nkvm:x:993:agent\n";
        assert_eq!(supplementary_gids(g, "agent"), vec![27, 993]);
    }

    #[test]
    fn hosts_replaces_the_127_0_1_1_line() {
        let out = hosts_with_hostname("127.0.0.1 localhost\n127.0.1.1 old\n::1 localhost\n", "vm");
        assert_eq!(out, "127.0.0.1 localhost\n::1 localhost\n127.0.1.1\tvm\n");
    }

    #[test]
    fn hosts_missing_gets_localhost() {
        assert_eq!(hosts_with_hostname("", "vm"), "127.0.0.1\tlocalhost\n127.0.1.1\tvm\n");
    }

    #[test]
    fn setup_user_writes_account_files_in_a_temp_root() {
        let root = std::env::temp_dir().join(format!("agentvm-guest-test-{}", std::process::id()));
        let etc = root.join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("passwd"), PASSWD).unwrap();
        fs::write(etc.join("group"), "root:x:0:\nsudo:x:27:\n").unwrap();
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let user = User { name: "agent".into(), uid, gid: 4242, home: "/home/agent".into() };
        let user = User { gid: if uid == 0 { user.gid } else { gid }, ..user };
        setup_user(&root, &user).unwrap();
        let passwd = fs::read_to_string(etc.join("passwd")).unwrap();
        assert!(passwd.ends_with(&format!("agent:x:{uid}:{}::/home/agent:/bin/bash\n", user.gid)));
        assert!(fs::read_to_string(etc.join("group")).unwrap().contains("sudo:x:27:agent\n"));
        assert!(fs::read_to_string(etc.join("shadow")).unwrap().starts_with("agent:*:"));
        let sudoers = etc.join("sudoers.d/agentvm");
        assert_eq!(fs::metadata(&sudoers).unwrap().permissions().mode() & 0o777, 0o440);
        assert!(root.join("home/agent").is_dir());
        assert_eq!(user_groups(&root, &user).unwrap(), vec![user.gid, 27]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn login_path_script_only_when_path_is_set_and_quoted() {
        let root = std::env::temp_dir().join(format!("agentvm-guest-path-{}", std::process::id()));
        setup_login_path(&root, &[("A".into(), "1".into())]).unwrap();
        assert!(!root.join(PROFILE_PATH_SCRIPT).exists());
        setup_login_path(&root, &[("PATH".into(), "/nix/store/a/bin:/it's".into())]).unwrap();
        let text = fs::read_to_string(root.join(PROFILE_PATH_SCRIPT)).unwrap();
        fs::remove_dir_all(&root).unwrap();
        assert!(text.contains("PATH='/nix/store/a/bin:/it'\\''s'\nexport PATH\n"), "{text}");
    }

    #[test]
    fn bad_user_name_is_rejected() {
        let user = User { name: "a:b".into(), uid: 1, gid: 1, home: "/h".into() };
        assert!(matches!(setup_user(Path::new("/nonexistent"), &user), Err(Error::BadSpec(_))));
    }
}
