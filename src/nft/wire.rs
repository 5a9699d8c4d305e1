//! nf_tables netlink messages, byte for byte.
//!
//! Only what tproxyd needs: a batch (one transaction) holding table, set
//! and set-element messages, and the acknowledgements that come back. The
//! layout follows the kernel's `include/uapi/linux/netfilter/nf_tables.h`
//! and `nfnetlink.h`: a netlink header (host byte order), a `nfgenmsg`, then
//! attributes whose integers are big-endian, as libnftnl writes them.

use std::net::IpAddr;

const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNETLINK_V0: u8 = 0;
/// `NFPROTO_INET`: the `inet` family (IPv4 and IPv6 in one table).
pub const NFPROTO_INET: u8 = 1;
const AF_UNSPEC: u8 = 0;

// enum nf_tables_msg_types
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;

// enum nft_table_attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
// enum nft_set_attributes
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
// enum nft_set_desc_attributes
const NFTA_SET_DESC_SIZE: u16 = 1;
/// `NFT_SET_TIMEOUT`: elements carry their own timeout.
const NFT_SET_TIMEOUT: u32 = 0x10;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;

/// The key types of tproxyd's sets, with nft's datatype numbers (so
/// `nft list set` prints them as `ipv4_addr` / `ipv6_addr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ipv4,
    Ipv6,
}

impl KeyType {
    fn datatype(self) -> u32 {
        match self {
            KeyType::Ipv4 => 7, // TYPE_IPADDR
            KeyType::Ipv6 => 8, // TYPE_IP6ADDR
        }
    }

    fn len(self) -> u32 {
        match self {
            KeyType::Ipv4 => 4,
            KeyType::Ipv6 => 16,
        }
    }

    pub fn of(ip: IpAddr) -> KeyType {
        match ip {
            IpAddr::V4(_) => KeyType::Ipv4,
            IpAddr::V6(_) => KeyType::Ipv6,
        }
    }
}

/// Bytes of one element in a NEWSETELEM message (IPv6 key, timeout), for
/// sizing batches.
pub const ELEM_BYTES: usize = 48;

/// One nf_tables transaction under construction. Every message in it asks
/// for an acknowledgement, so the sender learns the outcome of each.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    next_seq: u32,
    first_seq: u32,
}

impl Batch {
    /// Starts a batch whose messages are numbered from `seq`.
    pub fn new(seq: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            next_seq: seq,
            first_seq: seq,
        };
        let at = b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, AF_UNSPEC);
        b.end_message(at);
        b.first_seq = b.next_seq;
        b
    }

    /// `add table` (`exclusive`: fail with EEXIST if it is there).
    pub fn new_table(&mut self, family: u8, name: &str, exclusive: bool) {
        let excl = if exclusive { NLM_F_EXCL } else { 0 };
        let at = self.nft_header(NFT_MSG_NEWTABLE, NLM_F_CREATE | excl, family);
        self.attr_str(NFTA_TABLE_NAME, name);
        self.attr_u32(NFTA_TABLE_FLAGS, 0);
        self.end_message(at);
    }

    /// `delete table`, with everything in it.
    pub fn del_table(&mut self, family: u8, name: &str) {
        let at = self.nft_header(NFT_MSG_DELTABLE, 0, family);
        self.attr_str(NFTA_TABLE_NAME, name);
        self.end_message(at);
    }

    /// `add set TABLE NAME { type ipv4_addr|ipv6_addr; flags timeout;
    /// size SIZE; }` (no size when 0): succeeds when a compatible set exists.
    pub fn new_set(&mut self, family: u8, table: &str, name: &str, key: KeyType, id: u32, size: u32) {
        let at = self.nft_header(NFT_MSG_NEWSET, NLM_F_CREATE, family);
        self.attr_str(NFTA_SET_TABLE, table);
        self.attr_str(NFTA_SET_NAME, name);
        self.attr_u32(NFTA_SET_FLAGS, NFT_SET_TIMEOUT);
        self.attr_u32(NFTA_SET_KEY_TYPE, key.datatype());
        self.attr_u32(NFTA_SET_KEY_LEN, key.len());
        if size > 0 {
            let desc = self.nest_start(NFTA_SET_DESC);
            self.attr_u32(NFTA_SET_DESC_SIZE, size);
            self.nest_end(desc);
        }
        self.attr_u32(NFTA_SET_ID, id);
        self.end_message(at);
    }

    /// `delete set`.
    pub fn del_set(&mut self, family: u8, table: &str, name: &str) {
        let at = self.nft_header(NFT_MSG_DELSET, 0, family);
        self.attr_str(NFTA_SET_TABLE, table);
        self.attr_str(NFTA_SET_NAME, name);
        self.end_message(at);
    }

    /// `add element TABLE SET { ip timeout T, ... }`. Without `NLM_F_EXCL`
    /// an element already present is not an error, and (kernel 6.12 and
    /// later) gets the new timeout: this is how a refresh is expressed.
    /// All `elems` must be of the set's key type.
    pub fn new_elements(&mut self, family: u8, table: &str, set: &str, elems: &[(IpAddr, u64)]) {
        let at = self.nft_header(NFT_MSG_NEWSETELEM, NLM_F_CREATE, family);
        self.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        self.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        let list = self.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        for &(ip, timeout_ms) in elems {
            let elem = self.nest_start(NFTA_LIST_ELEM);
            let key = self.nest_start(NFTA_SET_ELEM_KEY);
            match ip {
                IpAddr::V4(v4) => self.attr(NFTA_DATA_VALUE, &v4.octets()),
                IpAddr::V6(v6) => self.attr(NFTA_DATA_VALUE, &v6.octets()),
            }
            self.nest_end(key);
            self.attr(NFTA_SET_ELEM_TIMEOUT, &timeout_ms.to_be_bytes());
            self.nest_end(elem);
        }
        self.nest_end(list);
        self.end_message(at);
    }

    /// Messages that will be acknowledged.
    pub fn messages(&self) -> u32 {
        self.next_seq - self.first_seq
    }

    /// Sequence numbers of the acknowledged messages: `first..end`.
    pub fn seqs(&self) -> std::ops::Range<u32> {
        self.first_seq..self.next_seq
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages() == 0
    }

    /// Closes the batch: the bytes to send in one `send`.
    pub fn finish(mut self) -> Vec<u8> {
        let seq = self.next_seq;
        let at = self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, AF_UNSPEC);
        self.end_message(at);
        self.next_seq = seq;
        self.buf
    }

    fn nft_header(&mut self, msg: u16, flags: u16, family: u8) -> usize {
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            family,
        )
    }

    /// Writes a netlink header (length patched by `end_message`) and the
    /// nfgenmsg; returns where the message starts.
    fn header(&mut self, kind: u16, flags: u16, family: u8) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.next_seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.next_seq = self.next_seq.wrapping_add(1);
        // nfgenmsg: family, version, res_id (the subsystem, big-endian, in
        // batch delimiters; 0 in nf_tables messages).
        let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
            NFNL_SUBSYS_NFTABLES
        } else {
            0
        };
        self.buf.push(family);
        self.buf.push(NFNETLINK_V0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn end_message(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn attr_u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    /// A NUL-terminated string attribute (`NLA_STRING` as nft sends it).
    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    fn nest_start(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }
}

/// One acknowledgement: the sequence number it answers and its errno
/// (0 = success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u32,
    pub errno: i32,
}

/// The acknowledgements in one received datagram; other messages (and a
/// truncated tail) are skipped.
pub fn parse_acks(mut buf: &[u8]) -> Vec<Ack> {
    let mut acks = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let len = u32_at(buf, 0) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32_at(buf, 8);
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
            let code = u32_at(buf, NLMSG_HDRLEN) as i32;
            acks.push(Ack { seq, errno: -code });
        }
        let advance = (len + 3) & !3;
        buf = buf.get(advance..).unwrap_or_default();
    }
    acks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes([b[i], b[i + 1]])
    }
    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }

    #[test]
    fn a_batch_is_begin_messages_end_with_lengths_that_add_up() {
        let mut b = Batch::new(100);
        b.new_table(NFPROTO_INET, "t", true);
        b.new_elements(NFPROTO_INET, "t", "s4", &[("192.0.2.1".parse().unwrap(), 60_000)]);
        assert_eq!(b.messages(), 2);
        assert_eq!(b.seqs(), 101..103);
        let bytes = b.finish();
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < bytes.len() {
            let len = u32_at(&bytes, at) as usize;
            assert_eq!(len % 4, 0);
            kinds.push((u16_at(&bytes, at + 4), u32_at(&bytes, at + 8)));
            at += len;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(kinds, vec![(0x10, 100), (0x0a00, 101), (0x0a0c, 102), (0x11, 103)]);
        // BATCH_BEGIN names the nf_tables subsystem, big-endian.
        assert_eq!(&bytes[16..20], &[0, 0, 0, 10]);
    }

    #[test]
    fn an_element_carries_its_key_and_a_big_endian_timeout_in_ms() {
        let mut b = Batch::new(1);
        b.new_elements(NFPROTO_INET, "t", "s4", &[("198.51.100.7".parse().unwrap(), 90_000)]);
        let bytes = b.finish();
        let key = [198u8, 51, 100, 7];
        let i = bytes.windows(4).position(|w| w == key).unwrap();
        // NFTA_DATA_VALUE header right before the key.
        assert_eq!(u16_at(&bytes, i - 4), 8);
        assert_eq!(u16_at(&bytes, i - 2), NFTA_DATA_VALUE);
        // Then the timeout attribute.
        assert_eq!(u16_at(&bytes, i + 4), 12);
        assert_eq!(u16_at(&bytes, i + 6), NFTA_SET_ELEM_TIMEOUT);
        assert_eq!(&bytes[i + 8..i + 16], &90_000u64.to_be_bytes());
    }

    #[test]
    fn acks_parse_and_garbage_does_not_panic() {
        let mut buf = Vec::new();
        for (seq, code) in [(7u32, 0i32), (8, -17)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&code.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(
            parse_acks(&buf),
            vec![Ack { seq: 7, errno: 0 }, Ack { seq: 8, errno: 17 }]
        );
        for cut in 0..buf.len() {
            let _ = parse_acks(&buf[..cut]);
        }
        let _ = parse_acks(&[0xff; 64]);
        let _ = parse_acks(&[0; 64]);
    }
}
