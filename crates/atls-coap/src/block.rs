//! Blockwise transfer (RFC 7959), bounded: the Block option codec, Block1
//! reassembly of a request body and Block2 slicing of a response body.
//!
//! Written here rather than taken from coap-lite's `BlockHandler`, whose
//! cache has no bound on the number of transfers it holds nor on the size a
//! Block1 body may grow to: a server facing strangers needs both.

use std::time::{Duration, Instant};

use coap_lite::{Packet, ResponseType};

/// A Block1 or Block2 option value: block number, more flag, size exponent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockValue {
    /// Block number.
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent: the block holds 2^(szx + 4) bytes (0..=6).
    pub szx: u8,
}

/// Why a blockwise message cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// A malformed Block option (more than 3 bytes, SZX 7): 4.02 Bad Option.
    #[error("malformed Block option")]
    BadOption,
    /// A block out of order, or a body missing its start: 4.08.
    #[error("block out of sequence")]
    Incomplete,
    /// The body would exceed the limit: 4.13.
    #[error("body exceeds the limit")]
    TooLarge,
    /// Too many transfers in progress: 5.03.
    #[error("too many blockwise transfers in progress")]
    Busy,
}

impl BlockValue {
    /// Bytes in a block of this size.
    pub fn size(self) -> usize {
        1usize << (u32::from(self.szx.min(6)) + 4)
    }

    /// The size exponent of the largest block of at most `bytes` (16..=1024).
    pub fn szx_for(bytes: usize) -> u8 {
        let mut szx = 0u8;
        while szx < 6 && (1usize << (u32::from(szx) + 5)) <= bytes {
            szx += 1;
        }
        szx
    }

    /// Decode an option value (0 to 3 bytes, RFC 7959 §2.2).
    pub fn decode(bytes: &[u8]) -> Result<Self, BlockError> {
        if bytes.len() > 3 {
            return Err(BlockError::BadOption);
        }
        let value = bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        let szx = (value & 0x7) as u8;
        if szx == 7 {
            return Err(BlockError::BadOption);
        }
        Ok(Self {
            num: value >> 4,
            more: value & 0x8 != 0,
            szx,
        })
    }

    /// Encode as an option value (minimal length).
    pub fn encode(self) -> Vec<u8> {
        let value = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx & 0x7);
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        bytes.get(skip..).unwrap_or_default().to_vec()
    }
}

/// A request body arriving in Block1 blocks.
#[derive(Debug)]
pub struct Block1Assembly {
    body: Vec<u8>,
    next: u32,
    szx: u8,
    max: usize,
}

/// What one Block1 block did.
#[derive(Debug, PartialEq, Eq)]
pub enum Block1Step {
    /// More blocks are expected: answer 2.31 Continue echoing the block.
    Continue,
    /// The body is complete.
    Complete(Vec<u8>),
}

impl Block1Assembly {
    /// Start a body of at most `max` bytes with its first block.
    pub fn start(
        block: BlockValue,
        payload: &[u8],
        size1: Option<usize>,
        max: usize,
    ) -> Result<(Self, Block1Step), BlockError> {
        if block.num != 0 {
            return Err(BlockError::Incomplete);
        }
        if size1.is_some_and(|s| s > max) {
            return Err(BlockError::TooLarge);
        }
        let mut assembly = Self {
            body: Vec::new(),
            next: 0,
            szx: block.szx,
            max,
        };
        let step = assembly.accept(block, payload)?;
        Ok((assembly, step))
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// The number of the block expected next.
    pub fn next(&self) -> u32 {
        self.next
    }

    /// Add the next block.
    pub fn accept(&mut self, block: BlockValue, payload: &[u8]) -> Result<Block1Step, BlockError> {
        if block.num != self.next || block.szx != self.szx {
            return Err(BlockError::Incomplete);
        }
        if block.more && payload.len() != block.size() || payload.len() > block.size() {
            return Err(BlockError::BadOption);
        }
        if self.body.len().saturating_add(payload.len()) > self.max {
            return Err(BlockError::TooLarge);
        }
        self.body.extend_from_slice(payload);
        self.next = self.next.saturating_add(1);
        Ok(if block.more {
            Block1Step::Continue
        } else {
            Block1Step::Complete(std::mem::take(&mut self.body))
        })
    }
}

/// Block `num` of `body` at size exponent `szx`: the bytes and the option
/// value, or `None` past the end.
pub fn block2_slice(body: &[u8], num: u32, szx: u8) -> Option<(&[u8], BlockValue)> {
    // Three option bytes hold block numbers below 2^20.
    if num >= 1 << 20 {
        return None;
    }
    let size = BlockValue {
        num,
        more: false,
        szx,
    }
    .size();
    let start = usize::try_from(num).ok()?.checked_mul(size)?;
    if start > body.len() || (start == body.len() && start != 0) {
        return None;
    }
    let end = start.saturating_add(size).min(body.len());
    Some((
        body.get(start..end)?,
        BlockValue {
            num,
            more: end < body.len(),
            szx,
        },
    ))
}

/// A Block1 transfer not continued for this long is abandoned.
pub const BLOCK1_LIFETIME: Duration = Duration::from_secs(60);
/// Block1 transfers in progress at once, over all endpoints (each at most
/// the configured flight size): the bound on what strangers can make a
/// server buffer.
pub const MAX_BLOCK1_TRANSFERS: usize = 256;

/// One Block1 block of the endpoint's transfer in `slot`. Block 0 starts
/// (or restarts) a transfer; a block already received (a duplicate) is
/// acknowledged again and changes nothing; a gap is 4.08 and keeps the
/// transfer; a transfer idle for `BLOCK1_LIFETIME` is dropped; at most
/// `MAX_BLOCK1_TRANSFERS` run at once over all endpoints.
pub fn block1_step(
    slot: &mut Option<(Block1Assembly, Instant)>,
    transfers: usize,
    block: BlockValue,
    payload: &[u8],
    size1: Option<usize>,
    max: usize,
    now: Instant,
) -> Result<Block1Step, BlockError> {
    if slot
        .as_ref()
        .is_some_and(|(_, at)| now.saturating_duration_since(*at) > BLOCK1_LIFETIME)
    {
        *slot = None;
    }
    if block.num == 0 {
        if slot.is_none() && transfers >= MAX_BLOCK1_TRANSFERS {
            return Err(BlockError::Busy);
        }
        let (assembly, step) =
            Block1Assembly::start(block, payload, size1, max).inspect_err(|_| *slot = None)?;
        *slot = matches!(step, Block1Step::Continue).then_some((assembly, now));
        return Ok(step);
    }
    let Some((assembly, at)) = slot.as_mut() else {
        return Err(BlockError::Incomplete);
    };
    if block.num < assembly.next() {
        return Ok(Block1Step::Continue);
    }
    let step = assembly.accept(block, payload)?;
    *at = now;
    if matches!(step, Block1Step::Complete(_)) {
        *slot = None;
    }
    Ok(step)
}

/// The ETag of a Block2 body: 8 bytes of its SHA-256.
pub fn etag(body: &[u8]) -> [u8; 8] {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(body);
    let mut tag = [0u8; 8];
    tag.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    tag
}

/// The error answer to a blockwise request that cannot be used.
pub fn block_error(request: &Packet, e: BlockError) -> Packet {
    let code = match e {
        BlockError::BadOption => ResponseType::BadOption,
        BlockError::Incomplete => ResponseType::RequestEntityIncomplete,
        BlockError::TooLarge => ResponseType::RequestEntityTooLarge,
        BlockError::Busy => ResponseType::ServiceUnavailable,
    };
    crate::message::diagnostic(request, code, &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_values_round_trip() {
        for (num, more, szx) in [(0, false, 0), (0, true, 5), (15, true, 2), (1 << 19, false, 6)] {
            let b = BlockValue { num, more, szx };
            assert_eq!(BlockValue::decode(&b.encode()), Ok(b));
        }
        assert_eq!(
            BlockValue {
                num: 0,
                more: false,
                szx: 0
            }
            .encode(),
            Vec::<u8>::new()
        );
        assert_eq!(BlockValue::decode(&[0x07]), Err(BlockError::BadOption));
        assert_eq!(BlockValue::decode(&[1, 2, 3, 4]), Err(BlockError::BadOption));
        assert_eq!(BlockValue::szx_for(512), 5);
        assert_eq!(BlockValue::szx_for(64), 2);
        assert_eq!(BlockValue::szx_for(5000), 6);
    }

    #[test]
    fn block1_reassembly_is_ordered_and_bounded() {
        let b = |num, more| BlockValue { num, more, szx: 0 };
        let (mut a, step) = Block1Assembly::start(b(0, true), &[1; 16], None, 40).expect("start");
        assert_eq!(step, Block1Step::Continue);
        assert_eq!(a.accept(b(2, true), &[2; 16]), Err(BlockError::Incomplete));
        assert_eq!(a.accept(b(1, true), &[2; 15]), Err(BlockError::BadOption));
        assert_eq!(a.accept(b(1, true), &[2; 16]), Ok(Block1Step::Continue));
        assert_eq!(a.accept(b(2, true), &[3; 16]), Err(BlockError::TooLarge));
        let (mut a, _) = Block1Assembly::start(b(0, true), &[1; 16], None, 40).expect("start");
        match a.accept(b(1, false), &[2; 5]).expect("last") {
            Block1Step::Complete(body) => assert_eq!(body.len(), 21),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Block1Assembly::start(b(0, true), &[1; 16], Some(1 << 30), 40).map(|_| ()),
            Err(BlockError::TooLarge),
            "a Size1 over the limit is refused at once"
        );
        assert_eq!(
            Block1Assembly::start(b(7, true), &[1; 16], None, 40).map(|_| ()),
            Err(BlockError::Incomplete)
        );
    }

    #[test]
    fn block2_slices_cover_the_body() {
        let body: Vec<u8> = (0..100u8).collect();
        let (first, v) = block2_slice(&body, 0, 1).expect("first");
        assert_eq!((first.len(), v.more), (32, true));
        let (last, v) = block2_slice(&body, 3, 1).expect("last");
        assert_eq!((last.len(), v.more), (4, false));
        assert!(block2_slice(&body, 4, 1).is_none());
        assert!(block2_slice(&body, u32::MAX, 6).is_none());
        assert_eq!(
            block2_slice(&[], 0, 1).map(|(b, v)| (b.len(), v.more)),
            Some((0, false))
        );
    }
}
