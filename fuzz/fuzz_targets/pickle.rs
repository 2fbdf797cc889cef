//! The pickle decoder and the record decoding never panic on arbitrary
//! bytes, and stay within their documented bounds.
#![no_main]

use coriolis_ovm_exporter::ovm::agent_records::{self, RepositoryRecord};
use coriolis_ovm_exporter::ovm::pickle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pickle::decode(data);
    let _ = RepositoryRecord::from_pickle(b"0004fb00000300006a09d4e1065041cb", data);
    let _ = agent_records::manager_ip_from_pickle(data);
    // The protocol-0 string argument decoders on their own.
    let _ = pickle::decode_string_repr(data);
    let _ = pickle::decode_raw_unicode_escape(data);
});
