//! Blockwise transfer inside OSCORE at the endpoint that answers (RFC 8613
//! §4.1.3.4.2: Block options are inner, end to end), for any server that
//! terminates OSCORE for CoAP clients — over CoAP, or over HTTP behind a
//! CoAP-to-HTTP gateway. Sans-IO: the caller unprotects, asks
//! [`InnerTransfers::request`] what to do, runs the whole request, and
//! passes the whole response through [`InnerTransfers::response`] before it
//! protects it.
//!
//! Bounded: at most `max_transfers` transfers (least recently used dropped
//! first), each body at most `max_body` bytes, at most `max_bytes` held
//! over all of them.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, ResponseType};

use crate::block::{block2_slice, Block1Assembly, Block1Step, BlockError, BlockValue, BLOCK1_LIFETIME};
use crate::message::{read_uint, uint_option};

/// A response kept for Block2 follow-ups is dropped after this long unused.
const BLOCK2_LIFETIME: Duration = Duration::from_secs(60);

struct Transfer {
    block1: Option<Block1Assembly>,
    /// The kept response: code, body and its ETag (RFC 7959 §2.4).
    block2: Option<(MessageClass, Vec<u8>, [u8; 8])>,
    seen: Instant,
}

impl Transfer {
    /// Bytes held: the request body arriving and the response kept.
    fn bytes(&self) -> usize {
        self.block2
            .as_ref()
            .map_or(0, |(_, b, _)| b.len())
            .saturating_add(self.block1.as_ref().map_or(0, Block1Assembly::len))
    }
}

/// The inner transfers in progress, one per key (a session).
pub struct InnerTransfers<K> {
    map: HashMap<K, Transfer>,
    max_transfers: usize,
    max_body: usize,
    max_bytes: usize,
    /// Largest block this side sends (16..=1024).
    block_size: usize,
    bytes: usize,
}

impl<K> std::fmt::Debug for InnerTransfers<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerTransfers")
            .field("transfers", &self.map.len())
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

fn inner_answer(code: ResponseType) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p
}

fn block_code(e: BlockError) -> ResponseType {
    match e {
        BlockError::BadOption => ResponseType::BadOption,
        BlockError::Incomplete => ResponseType::RequestEntityIncomplete,
        BlockError::TooLarge => ResponseType::RequestEntityTooLarge,
        BlockError::Busy => ResponseType::ServiceUnavailable,
    }
}

impl<K: Hash + Eq + Clone> InnerTransfers<K> {
    /// At most `max_transfers` transfers of at most `max_body` bytes each
    /// and `max_bytes` of kept responses in all; blocks of `block_size`.
    pub fn new(max_transfers: usize, max_body: usize, max_bytes: usize, block_size: usize) -> Self {
        Self {
            map: HashMap::new(),
            max_transfers: max_transfers.max(1),
            max_body,
            max_bytes,
            block_size: block_size.clamp(16, 1024),
            bytes: 0,
        }
    }

    /// Transfers in progress and bytes held.
    pub fn held(&self) -> (usize, usize) {
        (self.map.len(), self.bytes)
    }

    /// Forget the transfer of `key` (its session ended).
    pub fn remove(&mut self, key: &K) {
        if let Some(t) = self.map.remove(key) {
            self.bytes = self.bytes.saturating_sub(t.bytes());
        }
    }

    /// Drop the least recently used transfer.
    fn evict_one(&mut self) {
        let oldest = self
            .map
            .iter()
            .min_by_key(|(_, t)| t.seen)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.remove(&k);
        }
    }

    fn entry(&mut self, key: &K, now: Instant) -> &mut Transfer {
        if !self.map.contains_key(key) {
            while self.map.len() >= self.max_transfers {
                self.evict_one();
            }
        }
        let t = self.map.entry(key.clone()).or_insert(Transfer {
            block1: None,
            block2: None,
            seen: now,
        });
        if now.saturating_duration_since(t.seen) > BLOCK1_LIFETIME.max(BLOCK2_LIFETIME) {
            let held = t.bytes();
            t.block1 = None;
            t.block2 = None;
            self.bytes = self.bytes.saturating_sub(held);
        }
        t.seen = now;
        t
    }

    /// What to do with the decrypted inner request `inner` of `key`: `Ok`
    /// with the whole request to run (a Block1 body reassembled), or `Err`
    /// with the inner answer to protect and send now (2.31 Continue, a
    /// Block2 block of the kept response, or a blockwise error).
    pub fn request(&mut self, key: &K, inner: &Packet, now: Instant) -> Result<Packet, Packet> {
        if let Some(value) = inner.get_first_option(CoapOption::Block2) {
            let block = BlockValue::decode(value).map_err(|e| inner_answer(block_code(e)))?;
            if block.num > 0 {
                return Err(self.follow_up(key, block, now));
            }
        }
        let Some(value) = inner.get_first_option(CoapOption::Block1) else {
            return Ok(inner.clone());
        };
        let block = BlockValue::decode(value).map_err(|e| inner_answer(block_code(e)))?;
        let size1 = inner
            .get_first_option(CoapOption::Size1)
            .and_then(|v| read_uint(v))
            .map(|s| usize::try_from(s).unwrap_or(usize::MAX));
        let max = self.max_body;
        let t = self.entry(key, now);
        let held = t.bytes();
        let step = if block.num == 0 {
            Block1Assembly::start(block, &inner.payload, size1, max).map(|(assembly, step)| {
                t.block1 = matches!(step, Block1Step::Continue).then_some(assembly);
                step
            })
        } else {
            match t.block1.as_mut() {
                None => Err(BlockError::Incomplete),
                // A block already received: acknowledged again, nothing changes.
                Some(a) if block.num < a.next() => Ok(Block1Step::Continue),
                Some(a) => a.accept(block, &inner.payload),
            }
        };
        let answer = match step {
            Ok(Block1Step::Continue) => {
                let mut p = inner_answer(ResponseType::Continue);
                p.add_option(CoapOption::Block1, value.clone());
                Err(p)
            }
            Ok(Block1Step::Complete(body)) => {
                t.block1 = None;
                let mut whole = inner.clone();
                whole.clear_option(CoapOption::Block1);
                whole.clear_option(CoapOption::Size1);
                whole.payload = body;
                Ok(whole)
            }
            Err(e) => {
                if e != BlockError::Incomplete {
                    t.block1 = None;
                }
                Err(inner_answer(block_code(e)))
            }
        };
        let now_held = t.bytes();
        self.bytes = self.bytes.saturating_add(now_held).saturating_sub(held);
        // Over the byte budget: the least recently used transfers go.
        while self.bytes > self.max_bytes && !self.map.is_empty() {
            self.evict_one();
        }
        answer
    }

    fn follow_up(&mut self, key: &K, block: BlockValue, now: Instant) -> Packet {
        let szx = block.szx.min(BlockValue::szx_for(self.block_size));
        let Some(t) = self.map.get_mut(key) else {
            return inner_answer(ResponseType::RequestEntityIncomplete);
        };
        t.seen = now;
        let Some((code, body, tag)) = t.block2.as_ref() else {
            return inner_answer(ResponseType::RequestEntityIncomplete);
        };
        let Some((slice, value)) = block2_slice(body, block.num, szx) else {
            return inner_answer(ResponseType::RequestEntityIncomplete);
        };
        let mut p = Packet::new();
        p.header.code = *code;
        p.add_option(CoapOption::Block2, value.encode());
        p.add_option(CoapOption::ETag, tag.to_vec());
        p.payload = slice.to_vec();
        if !value.more {
            // The whole response was fetched.
            if let Some((_, b, _)) = t.block2.take() {
                self.bytes = self.bytes.saturating_sub(b.len());
            }
        }
        p
    }

    /// The inner answer to `request` (as it arrived, with its Block
    /// options) from the whole `response`: Block1 echoed, and the first
    /// Block2 block when the client does blockwise (it sent Block1, or
    /// asked for Block2 early, RFC 7959 §2.4) and the body exceeds its
    /// block; the rest is kept for its follow-ups. A client that does
    /// neither gets the whole response.
    pub fn response(&mut self, key: &K, request: &Packet, mut response: Packet, now: Instant) -> Packet {
        let block1 = request.get_first_option(CoapOption::Block1).cloned();
        let asked = request
            .get_first_option(CoapOption::Block2)
            .and_then(|v| BlockValue::decode(v).ok());
        let szx = match (asked, block1.as_deref().and_then(|v| BlockValue::decode(v).ok())) {
            (Some(b), _) => Some(b.szx),
            (None, Some(b)) => Some(b.szx),
            (None, None) => None,
        }
        .map(|s| s.min(BlockValue::szx_for(self.block_size)));
        if let Some(value) = block1 {
            response.add_option(CoapOption::Block1, value);
        }
        let Some(szx) = szx else {
            return response;
        };
        let size = BlockValue {
            num: 0,
            more: false,
            szx,
        }
        .size();
        if response.payload.len() <= size {
            return response;
        }
        let body = std::mem::take(&mut response.payload);
        // The ETag names this body: a client fetching blocks sees when a
        // later answer replaced it (RFC 7959 §2.4).
        let tag = crate::block::etag(&body);
        if let Some((slice, value)) = block2_slice(&body, 0, szx) {
            response.payload = slice.to_vec();
            response.add_option(CoapOption::Block2, value.encode());
            response.add_option(CoapOption::ETag, tag.to_vec());
            response.add_option(CoapOption::Size2, uint_option(body.len() as u64));
        }
        let len = body.len();
        let code = response.header.code;
        // Room for it: older kept responses go first.
        if let Some(t) = self.map.get_mut(key) {
            if let Some((_, b, _)) = t.block2.take() {
                self.bytes = self.bytes.saturating_sub(b.len());
            }
        }
        while self.bytes.saturating_add(len) > self.max_bytes && !self.map.is_empty() {
            self.evict_one();
        }
        if len <= self.max_bytes {
            let t = self.entry(key, now);
            t.block2 = Some((code, body, tag));
            self.bytes = self.bytes.saturating_add(len);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::RequestType;

    fn post(payload: &[u8], block1: Option<BlockValue>) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Post);
        if let Some(b) = block1 {
            p.add_option(CoapOption::Block1, b.encode());
        }
        p.payload = payload.to_vec();
        p
    }

    #[test]
    fn a_body_arrives_in_blocks_and_the_answer_leaves_in_blocks() {
        let now = Instant::now();
        let mut t = InnerTransfers::new(4, 4096, 1 << 20, 1024);
        let b = |num, more| BlockValue { num, more, szx: 2 };
        let first = t
            .request(&1u8, &post(&[1; 64], Some(b(0, true))), now)
            .unwrap_err();
        assert_eq!(first.header.code, MessageClass::Response(ResponseType::Continue));
        // A duplicate of block 0 restarts nothing it should not.
        let last_req = post(&[2; 10], Some(b(1, false)));
        let whole = t.request(&1u8, &last_req, now).expect("complete");
        assert_eq!(whole.payload.len(), 74);
        assert!(whole.get_first_option(CoapOption::Block1).is_none());
        let mut response = inner_answer(ResponseType::Changed);
        response.payload = vec![7; 200];
        let answer = t.response(&1u8, &last_req, response, now);
        assert_eq!(answer.payload.len(), 64, "the client's block size");
        let tag = answer
            .get_first_option(CoapOption::ETag)
            .cloned()
            .expect("an ETag");
        assert_eq!(t.held(), (1, 200));
        let mut fetched = answer.payload.clone();
        for num in 1.. {
            let mut next = post(b"", None);
            next.add_option(
                CoapOption::Block2,
                BlockValue {
                    num,
                    more: false,
                    szx: 2,
                }
                .encode(),
            );
            let part = t.request(&1u8, &next, now).unwrap_err();
            assert_eq!(part.get_first_option(CoapOption::ETag), Some(&tag));
            fetched.extend_from_slice(&part.payload);
            let v =
                BlockValue::decode(part.get_first_option(CoapOption::Block2).expect("block2")).expect("v");
            if !v.more {
                break;
            }
        }
        assert_eq!(fetched, vec![7; 200]);
        assert_eq!(t.held().1, 0, "nothing kept once fetched");
    }

    #[test]
    fn a_client_that_does_no_blockwise_gets_the_whole_answer() {
        let now = Instant::now();
        let mut t = InnerTransfers::new(4, 4096, 1 << 20, 64);
        let request = post(b"x", None);
        let mut response = inner_answer(ResponseType::Content);
        response.payload = vec![1; 5000];
        assert_eq!(t.response(&1u8, &request, response, now).payload.len(), 5000);
        assert_eq!(t.held(), (0, 0));
    }

    #[test]
    fn transfers_and_bytes_are_bounded() {
        let now = Instant::now();
        let mut t = InnerTransfers::new(3, 100, 1000, 16);
        let b = BlockValue {
            num: 0,
            more: true,
            szx: 0,
        };
        for key in 0..10u8 {
            let _ = t.request(&key, &post(&[0; 16], Some(b)), now);
        }
        assert!(t.held().0 <= 3);
        assert_eq!(t.held().1, 16 * t.held().0, "bodies arriving are counted");
        // A body over max_body is 4.13 and leaves nothing behind.
        let mut big = post(&[0; 16], Some(b));
        big.add_option(CoapOption::Size1, uint_option(101));
        let refused = t.request(&42u8, &big, now).unwrap_err();
        assert_eq!(
            refused.header.code,
            MessageClass::Response(ResponseType::RequestEntityTooLarge)
        );
        let mut early = post(b"", None);
        early.add_option(
            CoapOption::Block2,
            BlockValue {
                num: 0,
                more: false,
                szx: 0,
            }
            .encode(),
        );
        for key in 0..10u8 {
            let mut response = inner_answer(ResponseType::Content);
            response.payload = vec![1; 400];
            let _ = t.response(&key, &early, response, now);
            assert!(t.held().1 <= 1000 && t.held().0 <= 3, "{:?}", t.held());
        }
        // A follow-up for a block past the end is 4.08, not a panic.
        let mut past = post(b"", None);
        past.add_option(
            CoapOption::Block2,
            BlockValue {
                num: 1000,
                more: false,
                szx: 0,
            }
            .encode(),
        );
        let answer = t.request(&9u8, &past, now).unwrap_err();
        assert_eq!(
            answer.header.code,
            MessageClass::Response(ResponseType::RequestEntityIncomplete)
        );
    }
}
