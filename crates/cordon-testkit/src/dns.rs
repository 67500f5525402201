//! A tiny DNS server for tests, on loopback UDP: names map to addresses the test sets and
//! changes at will, and a rebinding mode answers one address first and another afterwards
//! (TTL 0), the way a DNS-rebinding attacker would.
//!
//! ```no_run
//! # async fn f() {
//! let dns = cordon_testkit::dns::TestDns::start().await;
//! dns.set("api.test", vec!["127.0.0.1".parse().unwrap()]);
//! dns.rebind("evil.test", "127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
//! // point a resolver at dns.addr()
//! # }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

#[derive(Debug, Clone)]
enum Answer {
    Fixed(Vec<IpAddr>),
    /// `first` for the first answered query, `later` for every one after.
    Rebind {
        first: IpAddr,
        later: IpAddr,
        answered: usize,
    },
}

#[derive(Default)]
struct State {
    names: HashMap<String, Answer>,
    queries: HashMap<String, usize>,
}

pub struct TestDns {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    /// Listens on 127.0.0.1 (a free port). Unknown names get NXDOMAIN.
    pub async fn start() -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind test DNS");
        let addr = socket.local_addr().expect("test DNS address");
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(serve(socket, state.clone()));
        TestDns { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `name` answers `ips` (A and AAAA split by family), TTL 0.
    pub fn set(&self, name: &str, ips: Vec<IpAddr>) {
        self.state
            .lock()
            .unwrap()
            .names
            .insert(key(name), Answer::Fixed(ips));
    }

    /// `name` answers `first` once, then `later` for ever (TTL 0).
    pub fn rebind(&self, name: &str, first: IpAddr, later: IpAddr) {
        self.state.lock().unwrap().names.insert(
            key(name),
            Answer::Rebind {
                first,
                later,
                answered: 0,
            },
        );
    }

    /// How many queries (any type) asked for `name`.
    pub fn queries(&self, name: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .queries
            .get(&key(name))
            .copied()
            .unwrap_or(0)
    }
}

async fn serve(socket: UdpSocket, state: Arc<Mutex<State>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let reply = answer(&query, &state);
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn answer(query: &Message, state: &Mutex<State>) -> Message {
    let mut reply = Message::new();
    reply.set_id(query.id());
    reply.set_message_type(MessageType::Response);
    reply.set_op_code(query.op_code());
    reply.set_recursion_desired(query.recursion_desired());
    reply.set_recursion_available(true);
    reply.set_authoritative(true);
    let Some(q) = query.queries().first() else {
        reply.set_response_code(ResponseCode::FormErr);
        return reply;
    };
    reply.add_query(q.clone());
    let name = key(&q.name().to_ascii());
    let mut state = state.lock().unwrap();
    *state.queries.entry(name.clone()).or_default() += 1;
    let Some(entry) = state.names.get_mut(&name) else {
        reply.set_response_code(ResponseCode::NXDomain);
        return reply;
    };
    let wanted = |ip: &IpAddr| match q.query_type() {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        _ => false,
    };
    let ips: Vec<IpAddr> = match entry {
        Answer::Fixed(ips) => ips.iter().copied().filter(wanted).collect(),
        Answer::Rebind {
            first,
            later,
            answered,
        } => {
            let ip = if *answered == 0 { *first } else { *later };
            if wanted(&ip) {
                *answered += 1;
                vec![ip]
            } else {
                vec![]
            }
        }
    };
    for ip in ips {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        reply.add_answer(Record::from_rdata(q.name().clone(), 0, rdata));
    }
    reply
}
