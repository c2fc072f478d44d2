//! Name resolution without the C library: the launcher is linked
//! statically, and a static glibc's getaddrinfo loads the host's NSS
//! modules at run time, which may not match it. So the egress proxy
//! resolves names itself, as a stub resolver: `/etc/hosts` first, then the
//! name servers of `/etc/resolv.conf` (`nameserver`, `search`/`domain`,
//! `options ndots: timeout: attempts:`), over UDP with TCP when an answer
//! is truncated. DNS messages are read with hickory-proto's parser. Every
//! lookup has a deadline, and its answers are bounded.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Where the name servers and the search list are.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where the host's fixed names are.
pub const HOSTS: &str = "/etc/hosts";
/// The longest a lookup may take, all name servers and tries together.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(10);
/// Config files read at most this much (they are a few lines).
const MAX_FILE: u64 = 64 * 1024;
/// Addresses kept of one lookup.
const MAX_ADDRESSES: usize = 16;
/// CNAMEs followed within one answer.
const MAX_CNAMES: usize = 8;
/// Name servers used, as glibc does (MAXNS).
const MAX_SERVERS: usize = 3;
/// Search domains used, as glibc does.
const MAX_SEARCH: usize = 6;
/// The largest DNS message over UDP (without EDNS) and over TCP.
const UDP_MESSAGE: usize = 512;
const TCP_MESSAGE: usize = 65535;

/// Why a name has no address.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The name given (no error lies under it).
    #[error("{0:?} is not a host name DNS can look up")]
    BadName(String),
    #[error("{name} has no address (the name servers {servers} know no such name)")]
    NotFound { name: String, servers: String },
    #[error("no name server answered for {name} within {}s (asked {servers} from {RESOLV_CONF}): {last}", LOOKUP_DEADLINE.as_secs())]
    NoAnswer { name: String, servers: String, last: String },
}

/// What `/etc/resolv.conf` says, with glibc's defaults and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
    /// How long one try of one name server may take.
    pub timeout: Duration,
    pub attempts: u32,
}

impl Default for ResolvConf {
    fn default() -> ResolvConf {
        ResolvConf {
            nameservers: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 53))],
            search: Vec::new(),
            ndots: 1,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

impl ResolvConf {
    /// Parses resolv.conf's text; lines it does not know are ignored, as
    /// the C library does.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf { nameservers: Vec::new(), ..ResolvConf::default() };
        for line in text.lines() {
            let mut words = line.split(|c: char| c.is_ascii_whitespace()).filter(|w| !w.is_empty());
            match words.next() {
                Some("nameserver") => {
                    // A scoped (fe80::1%eth0) address does not parse: skipped.
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        if conf.nameservers.len() < MAX_SERVERS {
                            conf.nameservers.push(SocketAddr::new(ip, 53));
                        }
                    }
                }
                Some("search") | Some("domain") => {
                    conf.search = words.take(MAX_SEARCH).map(|w| w.trim_end_matches('.').to_string()).collect();
                }
                Some("options") => words.for_each(|o| conf.option(o)),
                _ => {}
            }
        }
        if conf.nameservers.is_empty() {
            conf.nameservers = ResolvConf::default().nameservers;
        }
        conf
    }

    fn option(&mut self, option: &str) {
        let Some((name, value)) = option.split_once(':') else { return };
        let Ok(n) = value.parse::<u32>() else { return };
        match name {
            "ndots" => self.ndots = n.min(15) as usize,
            "timeout" => self.timeout = Duration::from_secs(n.clamp(1, 30).into()),
            "attempts" => self.attempts = n.clamp(1, 5),
            _ => {}
        }
    }

    /// The names to ask for `name`, in order: as given first when it has
    /// `ndots` dots or more, else after the search domains; a name ending
    /// in a dot only as given.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if let Some(absolute) = name.strip_suffix('.') {
            return vec![absolute.to_string()];
        }
        let searched = self.search.iter().map(|d| format!("{name}.{d}"));
        if name.matches('.').count() >= self.ndots {
            std::iter::once(name.to_string()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.to_string())).collect()
        }
    }

    fn servers_text(&self) -> String {
        self.nameservers.iter().map(|s| s.ip().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// The addresses `/etc/hosts` text gives `name` (any case), in file order.
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_ascii_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else { continue };
        if words.any(|w| w.trim_end_matches('.').eq_ignore_ascii_case(name)) && !found.contains(&ip) {
            found.push(ip);
        }
    }
    found.truncate(MAX_ADDRESSES);
    found
}

/// Reads a small config file; a missing or unreadable one reads as empty,
/// as it does for the C library.
fn read_small(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_FILE).read_to_string(&mut text);
    }
    text
}

/// A stub resolver over the host's configuration.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub conf: ResolvConf,
    hosts: String,
}

/// What one name server said about one name.
enum Answer {
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN, or no address of either family.
    NoSuchName,
}

impl Resolver {
    /// The host's resolver, read now (the files may change while agentvm
    /// runs: each lookup may make its own).
    pub fn system() -> Resolver {
        Resolver::new(ResolvConf::parse(&read_small(Path::new(RESOLV_CONF))), read_small(Path::new(HOSTS)))
    }

    pub fn new(conf: ResolvConf, hosts: String) -> Resolver {
        Resolver { conf, hosts }
    }

    /// The addresses of `name` (IPv4 first), asking for at most
    /// [`LOOKUP_DEADLINE`]. An address literal is its own answer.
    pub fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let found = hosts_lookup(&self.hosts, name);
        if !found.is_empty() {
            return Ok(found);
        }
        let deadline = Instant::now() + LOOKUP_DEADLINE;
        let mut last_failure = None;
        for candidate in self.conf.candidates(name) {
            let query = Name::from_ascii(format!("{candidate}.")).map_err(|_| DnsError::BadName(name.into()))?;
            match self.ask_servers(&query, deadline) {
                Ok(Answer::Addresses(found)) => return Ok(found),
                Ok(Answer::NoSuchName) => {}
                Err(e) => last_failure = Some(e),
            }
        }
        let servers = self.conf.servers_text();
        Err(match last_failure {
            None => DnsError::NotFound { name: name.into(), servers },
            Some(e) => DnsError::NoAnswer { name: name.into(), servers, last: e.to_string() },
        })
    }

    /// Asks each name server in turn, for the configured number of rounds,
    /// until one answers (an answer that the name does not exist counts).
    fn ask_servers(&self, name: &Name, deadline: Instant) -> Result<Answer, io::Error> {
        let mut last = io::Error::new(io::ErrorKind::TimedOut, "no time left");
        for _ in 0..self.conf.attempts {
            for server in &self.conf.nameservers {
                let until = deadline.min(Instant::now() + self.conf.timeout);
                if until <= Instant::now() {
                    return Err(last);
                }
                match ask(*server, name, &[RecordType::A, RecordType::AAAA], until).and_then(|r| addresses(name, &r)) {
                    Ok(answer) => return Ok(answer),
                    Err(e) => last = e,
                }
            }
        }
        Err(last)
    }

    /// Whether some name server answers at all (any answer to a query for
    /// the root's name servers), within `within`: cheap, and no name of the
    /// outside world is needed. The server that answered, or why none did.
    pub fn probe(&self, within: Duration) -> Result<SocketAddr, String> {
        let until = Instant::now() + within;
        let mut why = Vec::new();
        for server in &self.conf.nameservers {
            match ask(*server, &Name::root(), &[RecordType::NS], until) {
                Ok(replies) if !replies.is_empty() => return Ok(*server),
                Ok(_) => why.push(format!("{}: no answer", server.ip())),
                Err(e) => why.push(format!("{}: {e}", server.ip())),
            }
        }
        Err(why.join("; "))
    }
}

/// The addresses in `replies` (one per record type asked) for `name`, or
/// the servers' refusal as an error.
fn addresses(name: &Name, replies: &[Message]) -> Result<Answer, io::Error> {
    let mut found = Vec::new();
    let mut no_such_name = false;
    for reply in replies {
        match reply.response_code() {
            ResponseCode::NoError => found.extend(answer_addresses(name, reply.answers())),
            ResponseCode::NXDomain => no_such_name = true,
            code => return Err(io::Error::other(format!("the name server answered {code}"))),
        }
    }
    if replies.is_empty() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
    }
    found.dedup();
    found.truncate(MAX_ADDRESSES);
    Ok(if found.is_empty() || no_such_name { Answer::NoSuchName } else { Answer::Addresses(found) })
}

/// The A and AAAA records of `name` in `answers`, following its CNAMEs.
fn answer_addresses(name: &Name, answers: &[Record]) -> Vec<IpAddr> {
    let mut names = vec![name.clone()];
    for _ in 0..MAX_CNAMES {
        let next = answers.iter().find_map(|r| match r.data() {
            RData::CNAME(target) if names.contains(r.name()) && !names.contains(&target.0) => Some(target.0.clone()),
            _ => None,
        });
        match next {
            Some(n) => names.push(n),
            None => break,
        }
    }
    let mut v4: Vec<IpAddr> = Vec::new();
    let mut v6: Vec<IpAddr> = Vec::new();
    for r in answers.iter().filter(|r| names.contains(r.name())) {
        match r.data() {
            RData::A(a) => v4.push(IpAddr::V4(a.0)),
            RData::AAAA(a) => v6.push(IpAddr::V6(a.0)),
            _ => {}
        }
    }
    v4.extend(v6);
    v4
}

/// A query for `name` and `rtype` with a random id.
fn query(name: &Name, rtype: RecordType) -> io::Result<Message> {
    let mut id = [0u8; 2];
    crate::sys::random_bytes(&mut id)?;
    let mut m = Message::new();
    m.set_id(u16::from_be_bytes(id))
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name.clone(), rtype));
    Ok(m)
}

/// Whether `reply` answers `asked`: its id, and the same question.
fn answers(reply: &Message, asked: &Message) -> bool {
    reply.id() == asked.id() && reply.message_type() == MessageType::Response && reply.queries() == asked.queries()
}

/// Asks `server` about `name`, one query per type in `types`, all at once
/// over UDP (a truncated answer again over TCP), until `until`. The replies
/// that came in time.
fn ask(server: SocketAddr, name: &Name, types: &[RecordType], until: Instant) -> io::Result<Vec<Message>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    // Connected: datagrams from any other address are not received.
    socket.connect(server)?;
    let mut pending = types.iter().map(|t| query(name, *t)).collect::<io::Result<Vec<_>>>()?;
    for q in &pending {
        socket.send(&q.to_vec().map_err(io::Error::other)?)?;
    }
    let mut replies = Vec::new();
    let mut buf = [0u8; UDP_MESSAGE];
    while !pending.is_empty() {
        let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
        socket.set_read_timeout(Some(left))?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        };
        // What does not parse or answer a pending query is dropped.
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        let Some(i) = pending.iter().position(|q| answers(&reply, q)) else { continue };
        let asked = pending.swap_remove(i);
        replies.push(if reply.truncated() { ask_tcp(server, &asked, until)? } else { reply });
    }
    if replies.is_empty() && !pending.is_empty() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{} did not answer in time", server.ip())));
    }
    Ok(replies)
}

/// Asks `server` the query `asked` over TCP, until `until`.
fn ask_tcp(server: SocketAddr, asked: &Message, until: Instant) -> io::Result<Message> {
    let left = || {
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no time left for DNS over TCP"))
    };
    let mut tcp = TcpStream::connect_timeout(&server, left()?)?;
    tcp.set_write_timeout(Some(left()?))?;
    let bytes = asked.to_vec().map_err(io::Error::other)?;
    let len = u16::try_from(bytes.len()).map_err(io::Error::other)?;
    tcp.write_all(&[&len.to_be_bytes()[..], &bytes].concat())?;
    tcp.set_read_timeout(Some(left()?))?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len)).min(TCP_MESSAGE)];
    tcp.read_exact(&mut reply)?;
    let reply = Message::from_vec(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if !answers(&reply, asked) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the TCP answer does not match the question"));
    }
    Ok(reply)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use std::net::TcpListener;

    #[test]
    fn resolv_conf_is_read_as_the_c_library_reads_it() {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver ::1\nnameserver 10.0.0.2\n\
             nameserver 10.0.0.3\nsearch a.example b.example.\noptions ndots:2 timeout:0 attempts:9 rotate\nbogus\n",
        );
        let servers: Vec<String> = conf.nameservers.iter().map(ToString::to_string).collect();
        assert_eq!(servers, ["10.0.0.1:53", "[::1]:53", "10.0.0.2:53"]);
        assert_eq!(conf.search, ["a.example", "b.example"]);
        assert_eq!((conf.ndots, conf.timeout, conf.attempts), (2, Duration::from_secs(1), 5));
        assert_eq!(ResolvConf::parse(""), ResolvConf::default(), "no file: the local server, glibc's defaults");
        assert_eq!(ResolvConf::parse("domain corp.example\n").search, ["corp.example"]);
    }

    #[test]
    fn search_domains_come_before_or_after_the_name_by_its_dots() {
        let conf = ResolvConf { search: vec!["corp.example".into()], ..ResolvConf::default() };
        assert_eq!(conf.candidates("proxy"), ["proxy.corp.example", "proxy"]);
        assert_eq!(conf.candidates("registry.npmjs.org"), ["registry.npmjs.org", "registry.npmjs.org.corp.example"]);
        assert_eq!(conf.candidates("proxy."), ["proxy"]);
    }

    #[test]
    fn hosts_entries_resolve_in_any_case_and_comments_are_skipped() {
        let hosts =
            "127.0.0.1 localhost\n# 10.0.0.9 proxy\n10.0.0.8 Proxy.Corp proxy # the proxy\n::1 proxy\nbad line\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(hosts_lookup(hosts, "proxy"), [ip("10.0.0.8"), ip("::1")]);
        assert_eq!(hosts_lookup(hosts, "PROXY.corp."), [ip("10.0.0.8")]);
        assert!(hosts_lookup(hosts, "10.0.0.9").is_empty() && hosts_lookup(hosts, "line").is_empty());
    }

    #[test]
    fn the_hosts_file_answers_before_dns_and_literals_answer_themselves() {
        // No server listens on port 9 of loopback: only the files may answer.
        let conf = ResolvConf {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_millis(200),
            attempts: 1,
            ..ResolvConf::default()
        };
        let r = Resolver::new(conf, "192.0.2.7 proxy.corp\n".into());
        assert_eq!(r.lookup("proxy.corp").unwrap(), ["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.lookup("[::1]").unwrap(), ["::1".parse::<IpAddr>().unwrap()]);
        let e = r.lookup("elsewhere.test").unwrap_err().to_string();
        assert!(e.contains("no name server answered for elsewhere.test") && e.contains("127.0.0.1"), "{e}");
    }

    /// A stand-in name server on loopback (UDP and TCP on one port) that
    /// answers with `answer(question)`; sets the truncated bit over UDP when
    /// `truncate`.
    pub(crate) struct StandInDns {
        pub addr: SocketAddr,
    }

    type Answerer = fn(&Query) -> (ResponseCode, Vec<Record>);

    fn reply_to(query: &Message, answer: Answerer) -> Message {
        let q = &query.queries()[0];
        let (code, records) = answer(q);
        let mut m = Message::new();
        m.set_id(query.id()).set_message_type(MessageType::Response).set_response_code(code).add_query(q.clone());
        m.add_answers(records);
        m
    }

    impl StandInDns {
        pub(crate) fn start(answer: Answerer, truncate: bool) -> StandInDns {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = udp.local_addr().unwrap();
            let tcp = TcpListener::bind(addr).unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let q = Message::from_vec(&buf[..n]).unwrap();
                    let mut r = reply_to(&q, answer);
                    if truncate {
                        r.set_truncated(true);
                        r.take_answers();
                    }
                    udp.send_to(&r.to_vec().unwrap(), from).unwrap();
                }
            });
            std::thread::spawn(move || {
                for mut s in tcp.incoming().flatten() {
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len).unwrap();
                    let mut q = vec![0u8; u16::from_be_bytes(len).into()];
                    s.read_exact(&mut q).unwrap();
                    let r = reply_to(&Message::from_vec(&q).unwrap(), answer).to_vec().unwrap();
                    s.write_all(&[&(r.len() as u16).to_be_bytes()[..], &r].concat()).unwrap();
                }
            });
            StandInDns { addr }
        }

        pub(crate) fn resolver(&self) -> Resolver {
            let conf = ResolvConf {
                nameservers: vec![self.addr],
                search: vec!["corp.example".into()],
                timeout: Duration::from_millis(500),
                ..ResolvConf::default()
            };
            Resolver::new(conf, String::new())
        }
    }

    /// `www.example.test` is a CNAME of `web.example.test`, which has one
    /// address of each family; `proxy.corp.example` has one; every other
    /// name does not exist.
    pub(crate) fn example_zone(q: &Query) -> (ResponseCode, Vec<Record>) {
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let web = name("web.example.test.");
        let www = Record::from_rdata(name("www.example.test."), 60, RData::CNAME(CNAME(web.clone())));
        let unrelated = Record::from_rdata(name("other.test."), 60, RData::A(A::new(192, 0, 2, 99)));
        let records = match (q.name().to_ascii().as_str(), q.query_type()) {
            ("www.example.test.", RecordType::A) => {
                vec![www, unrelated, Record::from_rdata(web, 60, RData::A(A::new(192, 0, 2, 1)))]
            }
            ("www.example.test.", RecordType::AAAA) => {
                vec![www, Record::from_rdata(web, 60, RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)))]
            }
            ("proxy.corp.example.", RecordType::A) => {
                vec![Record::from_rdata(name("proxy.corp.example."), 60, RData::A(A::new(192, 0, 2, 8)))]
            }
            ("proxy.corp.example.", _) => vec![],
            _ => return (ResponseCode::NXDomain, vec![]),
        };
        (ResponseCode::NoError, records)
    }

    #[test]
    fn names_resolve_through_cnames_with_ipv4_first_and_nothing_unrelated() {
        let dns = StandInDns::start(example_zone, false);
        let got = dns.resolver().lookup("www.example.test").unwrap();
        let want: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        assert_eq!(got, want);
        assert_eq!(dns.resolver().lookup("proxy").unwrap(), ["192.0.2.8".parse::<IpAddr>().unwrap()], "search list");
        let e = dns.resolver().lookup("nowhere.test").unwrap_err();
        assert!(matches!(e, DnsError::NotFound { .. }), "{e}");
        assert!(dns.resolver().probe(Duration::from_secs(2)).is_ok());
    }

    #[test]
    fn truncated_answers_are_asked_again_over_tcp() {
        let dns = StandInDns::start(example_zone, true);
        assert_eq!(dns.resolver().lookup("www.example.test").unwrap().len(), 2);
    }

    #[test]
    fn a_silent_server_costs_the_lookup_its_deadline_at_most() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let conf = ResolvConf {
            nameservers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(300),
            attempts: 2,
            ..ResolvConf::default()
        };
        let started = Instant::now();
        let e = Resolver::new(conf, String::new()).lookup("quiet.test").unwrap_err();
        assert!(matches!(e, DnsError::NoAnswer { .. }), "{e}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(2), "{took:?}");
    }

    /// The host's own resolver finds a name of its /etc/hosts, as the C
    /// library would.
    #[test]
    fn the_system_resolver_reads_the_hosts_file() {
        let hosts = read_small(Path::new(HOSTS));
        let Some((ip, name)) = hosts.lines().find_map(|l| {
            let mut w = l.split('#').next()?.split_ascii_whitespace();
            Some((w.next()?.parse::<IpAddr>().ok()?, w.next()?.to_string()))
        }) else {
            return eprintln!("skipped: {HOSTS} names no host");
        };
        assert!(Resolver::system().lookup(&name).unwrap().contains(&ip), "{name}");
    }
}
