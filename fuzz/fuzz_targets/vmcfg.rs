//! The vm.cfg parser, the disk spec parser and the .ovsmeta parser never
//! panic on arbitrary bytes.
#![no_main]

use coriolis_ovm_exporter::ovm::vmcfg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = vmcfg::vm_config(data) {
        assert!(!cfg.name.is_empty());
    }
    let _ = vmcfg::parse(data);
    let _ = vmcfg::parse_disk_spec(data);
    let _ = vmcfg::parse_ovsmeta(data);
});
