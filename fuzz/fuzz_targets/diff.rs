//! Diff invariants on arbitrary maps: never panics; output sorted,
//! non-overlapping and not empty per range; and the diff is exactly the
//! rule of SEMANTICS.md §2 at every point: changed where b holds data that
//! is not the same plain block of a, zeroed where a held data and b reads
//! as zeros, nothing elsewhere. The classification is constant between two
//! extent boundaries of either map, so checking it at every such boundary
//! and at every end of the diff's own ranges checks it everywhere: a range
//! reported beyond or short of the rule fails. A changed range carries b's
//! physical address and flags.
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

/// What the rule says the diff must report at `p`.
#[derive(Debug, PartialEq)]
enum Class {
    Changed,
    Zeroed,
    Nothing,
}

fn class(a: &ExtentMap, b: &ExtentMap, p: u64) -> Class {
    let (ea, eb) = (at(a, p), at(b, p));
    match (ea, eb) {
        (_, Some(y)) if is_data(&eb) => {
            let same = ea.is_some_and(|x| {
                x.is_plain()
                    && y.is_plain()
                    && x.physical.wrapping_add(p - x.logical)
                        == y.physical.wrapping_add(p - y.logical)
            });
            if same {
                Class::Nothing
            } else {
                Class::Changed
            }
        }
        _ if is_data(&ea) => Class::Zeroed,
        _ => Class::Nothing,
    }
}

fuzz_target!(|input: (Vec<RawExtent>, Vec<RawExtent>)| {
    let a = build(&input.0);
    let b = build(&input.1);
    let d = diff(&a, &b);
    let mut end = 0;
    for c in &d.changed {
        assert!(c.length > 0 && c.logical >= end, "{d:?}");
        end = c.end();
        // The extent reported is b's at its start (merged ranges continue
        // physically).
        let eb = at(&b, c.logical).expect("changed lies in b");
        assert_eq!(c.physical, eb.physical.wrapping_add(c.logical - eb.logical));
        assert_eq!(c.flags, eb.flags & !flags::LAST);
    }
    end = 0;
    for z in &d.zeroed {
        assert!(z.length > 0 && z.start >= end, "{d:?}");
        end = z.end();
    }
    let in_changed = |p: u64| d.changed.iter().any(|c| c.logical <= p && p < c.end());
    let in_zeroed = |p: u64| d.zeroed.iter().any(|z| z.start <= p && p < z.end());
    let mut points: Vec<u64> = a
        .extents()
        .iter()
        .chain(b.extents())
        .flat_map(|e| [e.logical, e.end() - 1, e.end()])
        .chain(
            d.changed
                .iter()
                .flat_map(|c| [c.logical, c.end() - 1, c.end()]),
        )
        .chain(
            d.zeroed
                .iter()
                .flat_map(|z| [z.start, z.end() - 1, z.end()]),
        )
        .collect();
    points.push(0);
    points.sort_unstable();
    points.dedup();
    for p in points {
        let want = class(&a, &b, p);
        let got = match (in_changed(p), in_zeroed(p)) {
            (true, false) => Class::Changed,
            (false, true) => Class::Zeroed,
            (false, false) => Class::Nothing,
            (true, true) => panic!("byte {p} is both changed and zeroed: {d:?}"),
        };
        assert_eq!(
            got,
            want,
            "byte {p}: a={:?} b={:?} diff={d:?}",
            at(&a, p),
            at(&b, p)
        );
    }
});
