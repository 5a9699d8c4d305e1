//! Reading queries and writing responses, with hickory-proto's typed
//! messages. The common responses are written by [`super::encoder`], which
//! produces the same bytes as hickory's encoder with less work.

use hickory_proto::op::{Edns, EdnsFlags, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::names::printable;
use super::wire::Plain;

/// Smallest UDP payload every DNS client accepts (RFC 1035).
pub const CLASSIC_UDP_PAYLOAD: usize = 512;

/// A query worth answering.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u16,
    /// The question exactly as asked (letter case included): it is echoed
    /// back verbatim, as clients using 0x20 case randomization check. Its
    /// lowercase rule key ([`super::names::query_key`]) is not kept here:
    /// the rules are matched once, where it is made, and a cache miss
    /// would carry it (one allocation each) only for its debug lines.
    pub query: Query,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The client's EDNS, if it sent one: a reply must then carry one too.
    pub edns: Option<Edns>,
    /// The question name has no capital letter, so its cache key
    /// ([`super::names::wire_key`], the labels lowercased) is also its
    /// spelling on the wire: a miss sends that copy upstream instead of
    /// writing the `Name` out again label by label.
    pub lowercase: bool,
}

/// Why a datagram gets no normal answer.
#[derive(Debug)]
pub enum Rejection {
    /// Too short to hold a header, or not a query at all: no reply, because
    /// answering garbage or responses is how reflection loops start.
    Drop(&'static str),
    /// Answer with this error response (FORMERR, NOTIMP, BADVERS).
    Respond(Box<Message>),
}

impl Request {
    /// Largest UDP response the client accepts, never above `ours`.
    pub fn udp_limit(&self, ours: u16) -> usize {
        udp_limit(self.edns.as_ref().map(Edns::max_payload), ours)
    }
}

/// Largest UDP response a client that sent `edns_payload` in its OPT
/// record (`None`: no OPT) accepts, never above `ours`, never below 512.
pub fn udp_limit(edns_payload: Option<u16>, ours: u16) -> usize {
    match edns_payload {
        Some(p) => usize::from(p.min(ours)).max(CLASSIC_UDP_PAYLOAD),
        None => CLASSIC_UDP_PAYLOAD,
    }
}

/// Parses a query; never panics, whatever the bytes.
pub fn parse_request(bytes: &[u8]) -> Result<Request, Rejection> {
    let header = Header::read(&mut BinDecoder::new(bytes)).map_err(|_| Rejection::Drop("shorter than a header"))?;
    if header.message_type != MessageType::Query {
        return Err(Rejection::Drop("not a query"));
    }
    let error = |rcode: ResponseCode, query: Option<Query>| {
        let mut m = Message::error_msg(header.id, header.op_code, rcode);
        m.metadata.recursion_desired = header.recursion_desired;
        if let Some(q) = query {
            m.add_query(q);
        }
        Rejection::Respond(Box::new(m))
    };
    let Ok(mut message) = Message::from_vec(bytes) else {
        return Err(error(ResponseCode::FormErr, None));
    };
    if message.queries.len() != 1 {
        return Err(error(ResponseCode::FormErr, None));
    }
    let query = message.queries.swap_remove(0);
    if header.op_code != OpCode::Query {
        return Err(error(ResponseCode::NotImp, Some(query)));
    }
    if let Some(edns) = &message.edns {
        if edns.version() > 0 {
            // RFC 6891 6.1.3: answer BADVERS, with our own OPT (version 0).
            let mut m = Message::error_msg(header.id, header.op_code, ResponseCode::BADVERS);
            m.metadata.recursion_desired = header.recursion_desired;
            m.add_query(query);
            m.set_edns(Edns::new());
            return Err(Rejection::Respond(Box::new(m)));
        }
    }
    Ok(Request {
        id: header.id,
        recursion_desired: header.recursion_desired,
        checking_disabled: header.checking_disabled,
        lowercase: !query
            .name()
            .iter()
            .any(|label| label.iter().any(u8::is_ascii_uppercase)),
        query,
        edns: message.edns,
    })
}

/// The [`Request`] of a query that [`super::wire::plain`] read, exactly as
/// [`parse_request`] gives it for the same bytes, without hickory's whole
/// message parse (header, question list, the OPT record and its options):
/// only the name is decoded by hickory. A plain query is never an error
/// answer, so this is all `parse_request` would do with it.
pub fn plain_request(plain: &Plain<'_>) -> Option<Request> {
    let name = Name::read(&mut BinDecoder::new(plain.name)).ok()?;
    let mut query = Query::query(name, RecordType::from(plain.qtype));
    query.set_query_class(DNSClass::from(plain.qclass));
    let edns = plain.edns_payload.map(|payload| {
        let mut edns = Edns::new();
        // As hickory reads an OPT record's CLASS (RFC 6891 6.2.5).
        edns.set_max_payload(payload.max(CLASSIC_UDP_PAYLOAD as u16));
        *edns.flags_mut() = EdnsFlags::from(plain.edns_flags);
        edns
    });
    Some(Request {
        id: plain.id,
        query,
        recursion_desired: plain.recursion_desired,
        checking_disabled: plain.checking_disabled,
        edns,
        lowercase: !plain.capitals,
    })
}

/// An empty response to `req` with `rcode`: ID, question, RD and CD
/// copied, RA set, and an OPT record when the client sent one.
pub fn response(req: &Request, rcode: ResponseCode, our_payload: u16) -> Message {
    let mut m = Message::response(req.id, OpCode::Query);
    m.metadata.recursion_desired = req.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = req.checking_disabled;
    m.metadata.response_code = rcode;
    m.add_query(req.query.clone());
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(our_payload.max(CLASSIC_UDP_PAYLOAD as u16));
        m.set_edns(edns);
    }
    m
}

/// Encodes `msg`; when it is longer than `limit`, sends the header and
/// question only, with TC=1, so the client retries over TCP. The flag says
/// whether that happened.
pub fn encode(msg: &Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    // The common shapes are written directly, byte for byte as below
    // (see `encoder`); an answer over the limit takes the full path, which
    // truncates it.
    if let Some(bytes) = super::encoder::encode(msg).filter(|b| b.len() <= limit) {
        return Some((bytes, false));
    }
    match msg.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some((bytes, false)),
        Ok(_) => msg.truncate().to_vec().ok().map(|b| (b, true)),
        Err(e) => {
            tracing::debug!(error = %printable(&e.to_string()), "cannot encode a response; answering SERVFAIL");
            let mut fail = Message::error_msg(msg.metadata.id, msg.metadata.op_code, ResponseCode::ServFail);
            fail.add_queries(msg.queries.iter().cloned());
            fail.to_vec().ok().map(|b| (b, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, rdata::A};
    use std::str::FromStr;

    fn query_bytes(name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn respond(r: Result<Request, Rejection>) -> Message {
        match r {
            Err(Rejection::Respond(m)) => *m,
            other => panic!("expected an error response, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_query_and_keeps_its_case() {
        let req = parse_request(&query_bytes("WwW.Example.COM.", Some(4096))).unwrap();
        assert_eq!(req.id, 0x1234);
        assert_eq!(crate::dns::names::query_key(req.query.name()), "www.example.com");
        assert_eq!(req.query.name().to_string(), "WwW.Example.COM.");
        assert!(req.recursion_desired);
        assert_eq!(req.udp_limit(1232), 1232);
        assert_eq!(req.udp_limit(8192), 4096);
        let plain = parse_request(&query_bytes("a.example.", None)).unwrap();
        assert_eq!(plain.udp_limit(1232), 512);
    }

    #[test]
    fn short_datagrams_and_responses_are_dropped() {
        assert!(matches!(parse_request(&[]), Err(Rejection::Drop(_))));
        assert!(matches!(parse_request(&[0; 11]), Err(Rejection::Drop(_))));
        let mut resp = query_bytes("a.example.", None);
        resp[2] |= 0x80; // QR
        assert!(matches!(parse_request(&resp), Err(Rejection::Drop(_))));
    }

    #[test]
    fn a_broken_body_gets_formerr_with_the_id() {
        let mut bytes = query_bytes("a.example.", None);
        bytes.truncate(bytes.len() - 3);
        let m = respond(parse_request(&bytes));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired);
        // Header claiming two questions but carrying none.
        let mut hdr = vec![0xab, 0xcd, 0x01, 0x00, 0, 2, 0, 0, 0, 0, 0, 0];
        let m = respond(parse_request(&hdr));
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0xabcd, ResponseCode::FormErr)
        );
        // No question at all.
        hdr[5] = 0;
        assert_eq!(
            respond(parse_request(&hdr)).metadata.response_code,
            ResponseCode::FormErr
        );
    }

    #[test]
    fn other_opcodes_get_notimp() {
        let mut bytes = query_bytes("a.example.", None);
        bytes[2] |= 2 << 3; // STATUS
        let m = respond(parse_request(&bytes));
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(m.queries.len(), 1);
    }

    #[test]
    fn edns_version_1_gets_badvers() {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_str("a.example.").unwrap(), RecordType::A));
        let mut e = Edns::new();
        e.set_version(1);
        m.set_edns(e);
        let r = respond(parse_request(&m.to_vec().unwrap()));
        let wire = Message::from_vec(&r.to_vec().unwrap()).unwrap();
        // BADVERS shares code 16 with BADSIG; the decoder names it the latter.
        assert_eq!(u16::from(wire.metadata.response_code), 16);
        assert!(wire.edns.is_some(), "BADVERS must carry an OPT record");
    }

    #[test]
    fn oversize_answers_are_truncated_for_udp() {
        let req = parse_request(&query_bytes("big.example.", None)).unwrap();
        let mut m = response(&req, ResponseCode::NoError, 1232);
        for i in 0..100u8 {
            let rec = Record::from_rdata(req.query.name().clone(), 60, RData::A(A::new(192, 0, 2, i)));
            m.add_answer(rec);
        }
        let (full, truncated) = encode(&m, 65_535).unwrap();
        assert!(full.len() > 512 && !truncated);
        let (cut, truncated) = encode(&m, 512).unwrap();
        assert!(truncated);
        let wire = Message::from_vec(&cut).unwrap();
        assert!(wire.metadata.truncation);
        assert!(wire.answers.is_empty());
        assert_eq!(wire.queries[0].query_class(), DNSClass::IN);
        assert_eq!(wire.metadata.id, 0x1234);
    }

    #[test]
    fn plain_queries_give_the_request_the_full_parse_gives() {
        let mut checked = 0;
        for name in [
            "www.Example.test.",
            "a.test.",
            "_sip._udp.EXAMPLE.test.",
            "x-1.y_2.test.",
            ".",
        ] {
            for qtype in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::HTTPS,
                RecordType::Unknown(999),
            ] {
                for class in [DNSClass::IN, DNSClass::CH] {
                    for edns in [None, Some((4096, false)), Some((100, true)), Some((1232, true))] {
                        for (rd, cd, id) in [(true, false, 1), (false, true, 0xfffe)] {
                            let mut m = Message::query();
                            m.metadata.id = id;
                            m.metadata.recursion_desired = rd;
                            m.metadata.checking_disabled = cd;
                            let mut q = Query::query(Name::from_ascii(name).unwrap(), qtype);
                            q.set_query_class(class);
                            m.add_query(q);
                            if let Some((payload, dnssec_ok)) = edns {
                                let mut e = Edns::new();
                                e.set_max_payload(payload);
                                e.set_dnssec_ok(dnssec_ok);
                                m.set_edns(e);
                            }
                            let bytes = m.to_vec().unwrap();
                            let Some(plain) = super::super::wire::plain(&bytes, &mut Default::default()) else {
                                continue;
                            };
                            let ours = plain_request(&plain).unwrap();
                            let full = parse_request(&bytes).unwrap();
                            assert_eq!(
                                format!("{ours:?}"),
                                format!("{full:?}"),
                                "{name} {qtype} {class} {edns:?}"
                            );
                            assert!(ours.query.name().eq_case(full.query.name()));
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked >= 300, "{checked} plain queries checked");
    }

    #[test]
    fn fuzzish_inputs_never_panic() {
        let base = query_bytes("x.example.", Some(1232));
        for i in 0..base.len() {
            for b in [0u8, 0xff, 0x3f, 0xc0] {
                let mut v = base.clone();
                v[i] = b;
                let _ = parse_request(&v);
                v.truncate(i);
                let _ = parse_request(&v);
            }
        }
    }
}
