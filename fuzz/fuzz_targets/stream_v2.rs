//! Format version 2: any plan over any bytes encodes (zero blocks, zstd or
//! raw records, any span) to a body that decodes, in any chunking, to the
//! disk's bytes on the planned ranges; a body resumed at any record
//! boundary is the rest of the whole body's records; one flipped byte never
//! makes the decoder accept wrong data.
#![no_main]

use arbitrary::Arbitrary;
use coriolis_ovm_exporter::wire::stream::{self, Change, ChangeKind, Event, StreamHeader};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// (gap before, length in 512-byte units, is data) per range.
    ranges: Vec<(u16, u8, bool)>,
    /// Disk content: (offset in 4 KiB blocks, byte, run in 4 KiB blocks),
    /// over zeros.
    fills: Vec<(u8, u8, u8)>,
    level: Option<u8>,
    chunk: u16,
    flip: Option<(u32, u8)>,
}

fuzz_target!(|input: Input| {
    let mut pos = 0u64;
    let mut plan = Vec::new();
    for &(gap, len, is_data) in input.ranges.iter().take(16) {
        let offset = pos + gap as u64;
        let len = (len as u64 + 1) * 512;
        plan.push(Change {
            kind: if is_data { ChangeKind::Data } else { ChangeKind::Zero },
            offset,
            len,
        });
        pos = offset + len;
    }
    let size = pos + 1;
    if size > 8 << 20 {
        return;
    }
    let mut disk = vec![0u8; size as usize];
    for &(at, byte, run) in input.fills.iter().take(32) {
        let s = (at as usize * 4096).min(disk.len());
        let e = (s + run as usize * 4096 + 7).min(disk.len());
        for (i, b) in disk[s..e].iter_mut().enumerate() {
            *b = byte.wrapping_add((i % 3) as u8);
        }
    }
    let level = input.level.map(|l| 1 + (l % 5) as i32);
    let mut flags = stream::FLAG_ZERO_BLOCKS;
    if level.is_some() {
        flags |= stream::FLAG_ZSTD;
    }
    let header = StreamHeader {
        disk_size: size,
        records: 0,
        version: stream::VERSION_2,
        flags,
        start: 0,
        end: size,
        shard: 0,
        shards: 1,
    };
    let body = stream::encode_v2(&disk, &plan, &header, level);
    let events = stream::decode_all(&body, input.chunk as usize + 1).expect("own output decodes");
    let mut replica = vec![0xA5u8; disk.len()];
    let mut boundaries = vec![0u64];
    for ev in &events {
        match ev {
            Event::Zero { offset, len } => {
                replica[*offset as usize..(*offset + *len) as usize].fill(0);
                boundaries.push(offset + len);
            }
            Event::Data { offset, bytes } => {
                replica[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes)
            }
            Event::DataEnd { offset, len } => boundaries.push(offset + len),
            _ => {}
        }
    }
    for c in &plan {
        let r = c.offset as usize..(c.offset + c.len) as usize;
        match c.kind {
            ChangeKind::Data => assert_eq!(replica[r.clone()], disk[r]),
            ChangeKind::Zero => assert!(replica[r].iter().all(|&b| b == 0)),
        }
    }
    let records = &body[stream::HEADER_LEN_2..body.len() - stream::RECORD_LEN];
    for &from in boundaries.iter().take(8) {
        let h = StreamHeader {
            start: from,
            flags: flags | stream::FLAG_RESUMED,
            ..header
        };
        let rest = stream::encode_v2(&disk, &plan, &h, level);
        assert!(records.ends_with(&rest[stream::HEADER_LEN_2..rest.len() - stream::RECORD_LEN]));
    }

    if let Some((at, mask)) = input.flip {
        if mask != 0 {
            let mut bad = body.clone();
            let at = at as usize % bad.len();
            bad[at] ^= mask;
            if let Ok(events) = stream::decode_all(&bad, 4096) {
                // Only a bit zstd ignores can pass: the data must be exact.
                for ev in events {
                    if let Event::Data { offset, bytes } = ev {
                        let o = offset as usize;
                        assert_eq!(&bytes[..], &disk[o..o + bytes.len()], "flip at {at}");
                    }
                }
            }
        }
    }
});
