//! The guest's trust store: the CA certificates the host trusts, so that a
//! guest behind a network that inspects TLS (a company proxy re-signing
//! every server's certificate with a root of its own, which the host
//! trusts) verifies what the host verifies.
//!
//! Read from the host at each launch (it changes rarely, but the image is
//! not rebuilt for it): the system bundle (the first of [`SYSTEM_BUNDLES`],
//! where OpenSSL-based tools look on common distributions), plus the files
//! that `SSL_CERT_FILE`, `SSL_CERT_DIR` and `NODE_EXTRA_CA_CERTS` name.
//! Parsed with rustls' PEM parser, CERTIFICATE blocks only (a key sharing
//! a file never goes along), each one checked to parse as a certificate,
//! bounded in size and number, deduplicated. A source that is missing or
//! unreadable is a warning naming it, never a failed launch.
//!
//! The host's public roots replace the image's bundle (so the guest also
//! drops a root the host's distribution distrusted since the image was
//! built); the rest, with `--shield-secrets`' instance CA, joins it and
//! gets a small file of its own for Node, which keeps its own roots and
//! parses every extra certificate at start (a whole bundle there would
//! slow every `node` down). Nothing flows back: the host never reads the
//! guest's trust store, and the proxy verifies upstream servers against
//! the host's own.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use agentvm_proto::spec::{EXTRA_CA_PATH, SYSTEM_BUNDLE};
use agentvm_proto::CaTrust;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::CertificateDer;

/// Where OpenSSL-based tools find the system's CA bundle on common
/// distributions; the first that exists is the host's.
pub const SYSTEM_BUNDLES: &[&str] = &[
    // Debian, Ubuntu, Arch, Gentoo
    "/etc/ssl/certs/ca-certificates.crt",
    // Fedora, RHEL
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    // openSUSE
    "/etc/ssl/ca-bundle.pem",
    // Alpine
    "/etc/ssl/cert.pem",
];

/// Variables that name one more CA file on the host.
const FILE_VARS: [&str; 2] = ["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"];
/// The variable that names CA directories (colon-separated, as OpenSSL
/// reads it); every file in them is read.
const DIR_VAR: &str = "SSL_CERT_DIR";

/// A file larger than this is not read (the system bundles are ~200 KiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Files read from one CA directory at most.
pub const MAX_DIR_FILES: usize = 4096;
/// Certificates the guest gets at most, and their size together (DER); the
/// system bundles hold ~150 of ~1.4 KiB.
pub const MAX_CERTS: usize = 2000;
pub const MAX_CERT_BYTES: usize = 8 << 20;

/// Whether the guest trusts the host's CAs (`--host-ca`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HostCa {
    /// The host's CA certificates make up the guest's trust store.
    #[default]
    On,
    /// The image's public roots only.
    Off,
}

/// Where certificates were read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The system bundle's path, or `VAR=PATH`.
    pub label: String,
    /// The certificates it held, duplicates included; `None` for a file
    /// read already (through a link, or as another source).
    pub held: Option<usize>,
    /// Those of them no earlier source had.
    pub new: usize,
}

/// One certificate the host trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCert {
    pub der: CertificateDer<'static>,
    /// Whether it is one of the public web roots (Mozilla's, as
    /// webpki-roots carries them).
    pub public: bool,
}

/// The CA certificates the host trusts, and what reading them found.
#[derive(Debug, Default)]
pub struct HostCas {
    pub sources: Vec<Source>,
    /// Each once, in the order found.
    pub certs: Vec<HostCert>,
    /// Sources that could not be read, certificates that did not parse.
    pub warnings: Vec<String>,
    seen_certs: HashSet<Vec<u8>>,
    seen_files: HashSet<(u64, u64)>,
    /// The bounds: [`MAX_CERTS`] and [`MAX_CERT_BYTES`] (smaller in tests).
    max_certs: usize,
    max_bytes: usize,
    bytes: usize,
}

impl HostCas {
    /// The host's CAs: its system bundle and what its environment names.
    pub fn load(get_env: &dyn Fn(&str) -> Option<String>) -> HostCas {
        let system: Vec<&Path> = SYSTEM_BUNDLES.iter().map(Path::new).collect();
        HostCas::load_from(&system, get_env)
    }

    /// [`HostCas::load`] with the system bundle looked for at `system`.
    pub fn load_from(system: &[&Path], get_env: &dyn Fn(&str) -> Option<String>) -> HostCas {
        let mut cas = HostCas { max_certs: MAX_CERTS, max_bytes: MAX_CERT_BYTES, ..HostCas::default() };
        match system.iter().find(|p| p.exists()) {
            Some(bundle) => cas.read_file(bundle.display().to_string(), bundle),
            None => cas.warnings.push(format!(
                "--host-ca: no system CA bundle at {}: the guest gets only what SSL_CERT_FILE, SSL_CERT_DIR and \
                 NODE_EXTRA_CA_CERTS name, besides its image's public roots",
                system.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )),
        }
        for var in FILE_VARS {
            if let Some(path) = get_env(var).filter(|v| !v.is_empty()) {
                cas.read_file(format!("{var}={path}"), Path::new(&path));
            }
        }
        if let Some(dirs) = get_env(DIR_VAR) {
            for dir in dirs.split(':').filter(|d| !d.is_empty()) {
                cas.read_dir(dir);
            }
        }
        cas
    }

    /// The certificates beyond the public web roots.
    pub fn extra(&self) -> impl Iterator<Item = &HostCert> {
        self.certs.iter().filter(|c| !c.public)
    }

    /// Reads the certificates of the file at `path`, known as `label`.
    fn read_file(&mut self, label: String, path: &Path) {
        let before = self.certs.len();
        match self.certs_in(&label, path) {
            Ok(held) => self.sources.push(Source { label, held, new: self.certs.len() - before }),
            Err(e) => self.warnings.push(format!("--host-ca: cannot read {label}: {e}; its CAs are left out")),
        }
    }

    /// Adds the certificates of `path`; how many it held, or `None` if this
    /// file was read already (through a link or another variable).
    fn certs_in(&mut self, label: &str, path: &Path) -> io::Result<Option<usize>> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !self.seen_files.insert((meta.dev(), meta.ino())) {
            return Ok(None);
        }
        if meta.len() > MAX_FILE_BYTES {
            let why = format!("it is larger than {} MiB", MAX_FILE_BYTES >> 20);
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        let (mut held, mut skipped) = (0, Vec::new());
        for item in CertificateDer::pem_reader_iter(BufReader::new(file.take(MAX_FILE_BYTES))) {
            let added = match item {
                Ok(der) => {
                    held += 1;
                    self.add(der)
                }
                Err(pem::Error::Io(e)) => return Err(e),
                Err(e) => Err(format!("a PEM block that does not decode: {e}")),
            };
            skipped.extend(added.err());
        }
        if let Some(first) = skipped.first() {
            self.warnings.push(format!("--host-ca: {label}: left out {} certificate(s), e.g. {first}", skipped.len()));
        }
        Ok(Some(held))
    }

    /// Adds `der` unless it is there already; an error says why it cannot
    /// go to the guest.
    fn add(&mut self, der: CertificateDer<'static>) -> Result<(), String> {
        if self.seen_certs.contains(der.as_ref()) {
            return Ok(());
        }
        let public = match webpki::anchor_from_trusted_cert(&der) {
            Ok(anchor) => is_public_root(&anchor),
            Err(e) => return Err(format!("one that does not parse as a certificate ({e:?})")),
        };
        if self.certs.len() >= self.max_certs || self.bytes + der.len() > self.max_bytes {
            let (n, mib) = (self.max_certs, self.max_bytes >> 20);
            return Err(format!("one past the first {n} certificates or {mib} MiB, which is all the guest gets"));
        }
        self.bytes += der.len();
        self.seen_certs.insert(der.to_vec());
        self.certs.push(HostCert { der, public });
        Ok(())
    }

    /// Reads every file of the CA directory `dir` (named by [`DIR_VAR`]),
    /// in name order, as one source.
    fn read_dir(&mut self, dir: &str) {
        let label = format!("{DIR_VAR}={dir}");
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).take(MAX_DIR_FILES + 1).collect(),
            Err(e) => return self.warnings.push(format!("--host-ca: cannot read {label}: {e}; its CAs are left out")),
        };
        if paths.len() > MAX_DIR_FILES {
            self.warnings
                .push(format!("--host-ca: {label} holds more than {MAX_DIR_FILES} files; the rest are left out"));
            paths.truncate(MAX_DIR_FILES);
        }
        paths.sort();
        let before = self.certs.len();
        let mut held = 0;
        for path in paths.iter().filter(|p| p.is_file()) {
            let file_label = format!("{label}: {}", path.display());
            match self.certs_in(&file_label, path) {
                Ok(n) => held += n.unwrap_or(0),
                Err(e) => self.warnings.push(format!("--host-ca: cannot read {file_label}: {e}; its CAs are left out")),
            }
        }
        self.sources.push(Source { label, held: Some(held), new: self.certs.len() - before });
    }
}

/// Whether `anchor` is one of the public web roots.
fn is_public_root(anchor: &rustls::pki_types::TrustAnchor<'_>) -> bool {
    webpki_roots::TLS_SERVER_ROOTS.iter().any(|root| {
        root.subject.as_ref() == anchor.subject.as_ref()
            && root.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
    })
}

/// A certificate's name for people: its subject's common name, else its
/// whole subject.
pub fn display_name(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => {
            let subject = cert.subject();
            let cn = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok());
            cn.map_or_else(|| subject.to_string(), str::to_string)
        }
        Err(_) => "(a certificate x509-parser cannot read)".into(),
    }
}

/// What the guest trusts for one launch, decided on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestTrust {
    /// The host's public roots: the guest's system bundle in place of the
    /// image's. Empty: the image's stays.
    pub public: Vec<CertificateDer<'static>>,
    /// Beyond the public roots: the host's company or local CAs, and the
    /// instance CA of `--shield-secrets`.
    pub extra: Vec<CertificateDer<'static>>,
}

impl GuestTrust {
    /// The guest's trust store under `mode`: the host's CAs (`host`, read
    /// unless `mode` is off) and the instance CA, if any.
    pub fn new(host: Option<&HostCas>, instance_ca: Option<&CertificateDer<'static>>) -> GuestTrust {
        let mut trust = GuestTrust::default();
        for cert in host.map_or(&[][..], |h| &h.certs[..]) {
            let list = if cert.public { &mut trust.public } else { &mut trust.extra };
            list.push(cert.der.clone());
        }
        trust.extra.extend(instance_ca.cloned());
        trust
    }

    /// As the launch spec carries it.
    pub fn spec(&self) -> CaTrust {
        CaTrust { bundle: self.public.iter().map(pem_of).collect(), extra: self.extra.iter().map(pem_of).collect() }
    }

    /// The environment that points common tools at the trust store: the
    /// system bundle for OpenSSL (`SSL_CERT_FILE`) and Python's requests
    /// (which has its own roots otherwise); the extras for Node (on top of
    /// its own roots). Nothing when the image's bundle stays as it is.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        if self.public.is_empty() && self.extra.is_empty() {
            return Vec::new();
        }
        let mut env = vec![
            ("SSL_CERT_FILE".to_string(), SYSTEM_BUNDLE.to_string()),
            ("REQUESTS_CA_BUNDLE".to_string(), SYSTEM_BUNDLE.to_string()),
        ];
        if !self.extra.is_empty() {
            env.push(("NODE_EXTRA_CA_CERTS".into(), EXTRA_CA_PATH.into()));
        }
        env
    }
}

/// `der` as a PEM block with Unix line ends.
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    let block = ::pem::Pem::new("CERTIFICATE", der.as_ref());
    ::pem::encode_config(&block, ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF))
}

/// The host's CAs for a launch under `mode` (`None` when off), with what
/// the user should hear about them told to `warn`.
pub fn for_launch(
    mode: HostCa,
    get_env: &dyn Fn(&str) -> Option<String>,
    warn: &mut dyn FnMut(String),
) -> Option<HostCas> {
    if mode == HostCa::Off {
        return None;
    }
    let mut cas = HostCas::load(get_env);
    std::mem::take(&mut cas.warnings).into_iter().for_each(warn);
    Some(cas)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A self-signed CA named `common_name`, as a company's would be.
    pub(crate) fn ca_named(common_name: &str) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    /// A public web root (Let's Encrypt's), as Mozilla ships it.
    const PUBLIC_ROOT: &str = include_str!("testdata/isrg-root-x1.pem");
    const A_KEY: &str = "-----BEGIN PRIVATE KEY-----\nTUlJQg==\n-----END PRIVATE KEY-----\n";

    fn public_root() -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(PUBLIC_ROOT.as_bytes()).unwrap()
    }

    fn env(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        move |k| vars.get(k).cloned()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn only_certificates_go_each_once_and_public_roots_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let company = ca_named("Example Company Inspection CA");
        let bundle = dir.path().join("ca-certificates.crt");
        let text = [pem_of(&company), A_KEY.into(), PUBLIC_ROOT.into(), pem_of(&company)].concat();
        std::fs::write(&bundle, text).unwrap();

        let cas = HostCas::load_from(&[&dir.path().join("missing.crt"), &bundle], &no_env);
        assert_eq!(cas.warnings, Vec::<String>::new());
        let label = bundle.display().to_string();
        assert_eq!(cas.sources, [Source { label, held: Some(3), new: 2 }]);
        assert_eq!(
            cas.certs,
            [HostCert { der: company.clone(), public: false }, HostCert { der: public_root(), public: true }]
        );
        assert_eq!(cas.extra().map(|c| display_name(&c.der)).collect::<Vec<_>>(), ["Example Company Inspection CA"]);
        let spec = GuestTrust::new(Some(&cas), None).spec();
        assert!(!spec.bundle.concat().contains("PRIVATE KEY") && !spec.extra.concat().contains("PRIVATE KEY"));
    }

    #[test]
    fn the_variables_add_files_and_directories_and_a_file_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let (system, own, certs) =
            (dir.path().join("system.crt"), dir.path().join("own.pem"), dir.path().join("certs"));
        std::fs::write(&system, PUBLIC_ROOT).unwrap();
        std::fs::write(&own, pem_of(&ca_named("Own CA"))).unwrap();
        std::fs::create_dir(&certs).unwrap();
        std::os::unix::fs::symlink(&system, certs.join("4042bcee.0")).unwrap();
        std::fs::write(certs.join("local.pem"), pem_of(&ca_named("Local CA"))).unwrap();
        std::fs::write(certs.join("README"), "not a certificate").unwrap();
        let vars = [
            ("SSL_CERT_FILE", own.display().to_string()),
            ("NODE_EXTRA_CA_CERTS", system.display().to_string()),
            ("SSL_CERT_DIR", format!("{}:", certs.display())),
        ];

        let cas = HostCas::load_from(&[&system], &env(&vars));
        assert_eq!(cas.warnings, Vec::<String>::new());
        let found: Vec<(&str, Option<usize>, usize)> =
            cas.sources.iter().map(|s| (s.label.split('=').next().unwrap(), s.held, s.new)).collect();
        let system_label = system.display().to_string();
        assert_eq!(
            found,
            [
                (system_label.as_str(), Some(1), 1),
                ("SSL_CERT_FILE", Some(1), 1),
                ("NODE_EXTRA_CA_CERTS", None, 0),
                ("SSL_CERT_DIR", Some(1), 1)
            ]
        );
        let names: Vec<String> = cas.extra().map(|c| display_name(&c.der)).collect();
        assert_eq!(names, ["Own CA", "Local CA"]);
    }

    #[test]
    fn what_cannot_be_read_is_a_warning_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("broken.pem");
        let not_a_cert = CertificateDer::from(b"not DER at all".to_vec());
        std::fs::write(&broken, [pem_of(&not_a_cert), PUBLIC_ROOT.into()].concat()).unwrap();
        let huge = dir.path().join("huge.pem");
        File::create(&huge).unwrap().set_len(MAX_FILE_BYTES + 1).unwrap();
        let vars = [
            ("SSL_CERT_FILE", broken.display().to_string()),
            ("NODE_EXTRA_CA_CERTS", huge.display().to_string()),
            ("SSL_CERT_DIR", "/nonexistent/agentvm-certs".to_string()),
        ];

        let cas = HostCas::load_from(&[Path::new("/nonexistent/bundle.crt")], &env(&vars));
        assert_eq!(cas.certs.len(), 1, "the good certificate of the broken file still goes");
        let w = &cas.warnings;
        assert_eq!(w.len(), 4, "{w:#?}");
        assert!(w[0].starts_with("--host-ca: no system CA bundle at /nonexistent/bundle.crt"), "{}", w[0]);
        assert!(
            w[1].starts_with(&format!(
                "--host-ca: SSL_CERT_FILE={}: left out 1 certificate(s), e.g. one that does not parse",
                broken.display()
            )),
            "{}",
            w[1]
        );
        assert!(w[2].contains(&format!("NODE_EXTRA_CA_CERTS={}: it is larger than 4 MiB", huge.display())), "{}", w[2]);
        assert!(w[3].starts_with("--host-ca: cannot read SSL_CERT_DIR=/nonexistent/agentvm-certs: "), "{}", w[3]);
    }

    #[test]
    fn the_guest_gets_a_bounded_number_and_size_of_certificates() {
        let mut cas = HostCas { max_certs: 2, max_bytes: 1 << 20, ..HostCas::default() };
        for name in ["A", "B", "C"] {
            let _ = cas.add(ca_named(name));
        }
        assert_eq!(cas.certs.len(), 2);
        assert!(cas.add(ca_named("D")).unwrap_err().contains("past the first 2 certificates or 1 MiB"));

        let one = ca_named("E");
        let mut cas = HostCas { max_certs: 10, max_bytes: one.len() + 10, ..HostCas::default() };
        cas.add(one).unwrap();
        assert!(cas.add(ca_named("F")).is_err(), "a second would pass the size");
    }

    #[test]
    fn the_guest_trusts_the_hosts_roots_its_other_cas_and_the_instance_ca() {
        let company = ca_named("Company CA");
        let instance = ca_named("agentvm instance CA");
        let mut cas = HostCas { max_certs: 10, max_bytes: 1 << 20, ..HostCas::default() };
        cas.add(public_root()).unwrap();
        cas.add(company.clone()).unwrap();

        let trust = GuestTrust::new(Some(&cas), Some(&instance));
        assert_eq!(trust, GuestTrust { public: vec![public_root()], extra: vec![company, instance.clone()] });
        let spec = trust.spec();
        assert_eq!(CertificateDer::from_pem_slice(spec.bundle[0].as_bytes()).unwrap(), public_root());
        assert!(spec.extra[0].ends_with("-----END CERTIFICATE-----\n") && !spec.extra[0].contains('\r'));

        let shield_only = GuestTrust::new(None, Some(&instance));
        assert_eq!(shield_only, GuestTrust { public: Vec::new(), extra: vec![instance] });
        assert!(GuestTrust::new(None, None).guest_env().is_empty(), "--host-ca=off alone: as the image is");
    }

    #[test]
    fn off_reads_nothing() {
        let mut warnings = Vec::new();
        assert!(for_launch(HostCa::Off, &no_env, &mut |w| warnings.push(w)).is_none());
        assert!(warnings.is_empty());
    }

    #[test]
    fn names_are_the_common_name_or_the_whole_subject() {
        assert_eq!(display_name(&public_root()), "ISRG Root X1");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "No CN Inc");
        let der = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().clone();
        assert_eq!(display_name(&der), "O=No CN Inc");
    }
}
