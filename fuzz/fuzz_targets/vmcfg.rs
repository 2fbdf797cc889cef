//! The vm.cfg parser, the disk spec parser and the .ovsmeta parser never
//! panic on arbitrary bytes, and keep their invariants: values nest at most
//! MAX_NESTING deep; `vm_config` agrees with `parse`; a disk spec's device
//! and mode hold no comma (the spec is split from the right) and its path
//! comes from the spec.
#![no_main]

use coriolis_ovm_exporter::ovm::pickle::bytes_to_text;
use coriolis_ovm_exporter::ovm::vmcfg::{self, DiskTarget, PyValue, MAX_NESTING};
use libfuzzer_sys::fuzz_target;

fn depth(v: &PyValue) -> usize {
    match v {
        PyValue::List(x) | PyValue::Tuple(x) => 1 + x.iter().map(depth).max().unwrap_or(0),
        PyValue::Dict(kv) => {
            1 + kv
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        _ => 0,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn check_spec(spec: &[u8]) {
    let d = vmcfg::parse_disk_spec(spec);
    assert_eq!(d.raw, bytes_to_text(spec));
    assert!(!d.device.contains(',') && !d.mode.contains(','), "{d:?}");
    use std::os::unix::ffi::OsStrExt;
    match &d.target {
        // An empty file target is an empty drive, never a file "".
        DiskTarget::File(p) => {
            assert!(!p.as_os_str().is_empty(), "{d:?}");
            assert!(contains(spec, p.as_os_str().as_bytes()), "{d:?}");
        }
        DiskTarget::Phy(p) => assert!(contains(spec, p.as_os_str().as_bytes()), "{d:?}"),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = vmcfg::parse(data);
    if let Ok(cfg) = &parsed {
        for (k, v) in &cfg.entries {
            assert!(depth(v) <= MAX_NESTING, "{k}: nesting {}", depth(v));
        }
    }
    match vmcfg::vm_config(data) {
        Ok(vm) => {
            let cfg = parsed
                .as_ref()
                .expect("vm_config parsed what parse refused");
            assert!(!vm.name.is_empty());
            match cfg.get("name") {
                Some(PyValue::Str(s)) => assert_eq!(vm.name, bytes_to_text(s)),
                other => panic!("name {other:?} gave {:?}", vm.name),
            }
            let listed = match cfg.get("disk") {
                Some(PyValue::List(x)) | Some(PyValue::Tuple(x)) => x.len(),
                _ => 0,
            };
            assert_eq!(vm.disks.len(), listed);
        }
        Err(_) => {}
    }
    check_spec(data);
    let _ = vmcfg::parse_ovsmeta(data);
});
