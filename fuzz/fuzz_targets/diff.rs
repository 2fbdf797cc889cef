//! Diff invariants on arbitrary maps: never panics; output sorted and
//! non-overlapping; changed ranges lie in b's data, zeroed ranges in a's
//! data where b reads as zeros; and every range whose mapping differs is
//! covered (checked at every extent boundary of either map, which is where
//! the classification can change).
#![no_main]

use arbitrary::Arbitrary;
use coriolis_ovm_exporter::extent::{diff, flags, Extent, ExtentMap};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct RawExtent {
    gap: u16,
    length: u16,
    physical: u8,
    flag_bits: u8,
}

fn build(raw: &[RawExtent]) -> ExtentMap {
    let mut pos = 0u64;
    let mut v = Vec::new();
    for r in raw.iter().take(512) {
        pos += r.gap as u64;
        let length = r.length as u64 + 1;
        let f = match r.flag_bits % 8 {
            0 => flags::UNWRITTEN,
            1 => flags::ENCODED,
            2 => flags::UNWRITTEN | flags::DELALLOC,
            3 => flags::SHARED,
            _ => 0,
        };
        v.push(Extent {
            logical: pos,
            physical: (r.physical as u64) << 12,
            length,
            flags: f,
        });
        pos += length;
    }
    ExtentMap::new(v).expect("built sorted")
}

/// The extent covering `pos`, if any.
fn at(m: &ExtentMap, pos: u64) -> Option<Extent> {
    let ex = m.extents();
    let i = ex.partition_point(|e| e.end() <= pos);
    ex.get(i).copied().filter(|e| e.logical <= pos)
}

fn is_data(e: &Option<Extent>) -> bool {
    e.is_some_and(|e| !e.reads_zero())
}

fuzz_target!(|input: (Vec<RawExtent>, Vec<RawExtent>)| {
    let a = build(&input.0);
    let b = build(&input.1);
    let d = diff(&a, &b);
    let mut end = 0;
    for c in &d.changed {
        assert!(c.length > 0 && c.logical >= end);
        end = c.end();
        assert!(is_data(&at(&b, c.logical)) && is_data(&at(&b, c.end() - 1)));
    }
    end = 0;
    for z in &d.zeroed {
        assert!(z.length > 0 && z.start >= end);
        end = z.end();
        assert!(is_data(&at(&a, z.start)) && !is_data(&at(&b, z.start)));
    }
    let covered = |pos: u64| {
        d.changed.iter().any(|c| c.logical <= pos && pos < c.end())
            || d.zeroed.iter().any(|z| z.start <= pos && pos < z.end())
    };
    let mut points: Vec<u64> = a
        .extents()
        .iter()
        .chain(b.extents())
        .flat_map(|e| [e.logical, e.end() - 1, e.end()])
        .collect();
    points.sort_unstable();
    points.dedup();
    for p in points {
        let (ea, eb) = (at(&a, p), at(&b, p));
        let differs = match (ea, eb) {
            (Some(x), Some(y)) if is_data(&ea) && is_data(&eb) => {
                !(x.is_plain()
                    && y.is_plain()
                    && x.physical.wrapping_add(p - x.logical) == y.physical.wrapping_add(p - y.logical))
            }
            _ => is_data(&ea) != is_data(&eb) || (is_data(&eb) && !is_data(&ea)),
        };
        if differs {
            assert!(covered(p), "missed byte {p}: a={ea:?} b={eb:?}");
        }
    }
});
