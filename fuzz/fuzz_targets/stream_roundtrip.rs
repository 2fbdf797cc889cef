//! Any valid plan encodes to a stream that decodes, in any chunking, to the
//! same records and bytes; one flipped byte anywhere is rejected.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use coriolis_ovm_exporter::wire::stream::{self, Encoder, Event};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// (gap before, length, is data) per record, kept small.
    records: Vec<(u8, u8, bool)>,
    chunk: u8,
    flip: Option<(u16, u8)>,
}

fuzz_target!(|input: Input| {
    let mut pos = 0u64;
    let mut plan = Vec::new();
    for &(gap, len, is_data) in input.records.iter().take(64) {
        let offset = pos + gap as u64;
        let len = len as u64 + 1;
        plan.push((offset, len, is_data));
        pos = offset + len;
    }
    let disk_size = pos + 1;
    let byte_at = |x: u64| (x.wrapping_mul(31) ^ (x >> 3)) as u8;
    let mut e = Encoder::new(disk_size, plan.len() as u64);
    let mut out = e.header().to_vec();
    for &(offset, len, is_data) in &plan {
        if is_data {
            out.extend_from_slice(&e.begin_data(offset, len).unwrap());
            let data: Vec<u8> = (offset..offset + len).map(byte_at).collect();
            e.data(&data).unwrap();
            out.extend_from_slice(&data);
            out.extend_from_slice(&e.end_data().unwrap());
        } else {
            out.extend_from_slice(&e.zero(offset, len).unwrap());
        }
    }
    out.extend_from_slice(&e.finish().unwrap());

    let events = stream::decode_all(&out, input.chunk as usize + 1).expect("own output decodes");
    let mut records = 0;
    for ev in &events {
        match ev {
            Event::Zero { offset, len } => {
                assert_eq!(plan[records], (*offset, *len, false));
                records += 1;
            }
            Event::Data { offset, bytes } => {
                let want: Vec<u8> = (*offset..*offset + bytes.len() as u64).map(byte_at).collect();
                assert_eq!(&bytes[..], &want[..]);
            }
            Event::DataEnd { offset, len } => {
                assert_eq!(plan[records], (*offset, *len, true));
                records += 1;
            }
            _ => {}
        }
    }
    assert_eq!(records, plan.len());

    if let Some((at, mask)) = input.flip {
        if mask != 0 {
            let mut bad = out.clone();
            let at = at as usize % bad.len();
            bad[at] ^= mask;
            let mut d = stream::Decoder::new();
            let mut input = Bytes::from(bad);
            let mut failed = false;
            loop {
                match d.decode(&mut input) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed || d.finish().is_err(), "flip of {mask:#x} at {at} accepted");
        }
    }
});
