//! `Range` header parsing never panics, and what it accepts is what the
//! server may send: non-empty, sorted, disjoint, non-adjacent ranges inside
//! the representation, no more than the cap.
#![no_main]

use coriolis_ovm_exporter::wire::range::{self, Multipart, RangeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, u8, &[u8])| {
    let (size, max, header) = input;
    let max = max as usize;
    match range::parse(header, size, max) {
        Ok(ranges) => {
            assert!(!ranges.is_empty() && ranges.len() <= max);
            for r in &ranges {
                assert!(r.start < r.end && r.end <= size);
            }
            for w in ranges.windows(2) {
                assert!(w[0].end < w[1].start, "sorted, disjoint, not adjacent");
            }
            let m = Multipart::with_boundary("b".into(), "application/octet-stream");
            let framing: u64 = ranges
                .iter()
                .map(|r| m.part_header(r, size).len() as u64)
                .sum();
            let data: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            assert_eq!(
                m.body_len(&ranges, size),
                framing + data + m.trailer().len() as u64
            );
        }
        Err(RangeError::Unsatisfiable { size: s }) => assert_eq!(s, size),
        Err(RangeError::TooMany { count, max: m }) => assert!(count > m),
        Err(_) => {}
    }
});
