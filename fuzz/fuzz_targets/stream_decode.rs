//! The incremental stream decoder on untrusted bytes, fed in chunks of
//! arbitrary sizes: never panics, never allocates by a length it read, and
//! whatever it accepts is consistent (records inside the disk, in order,
//! data adding up to what the end record says).
#![no_main]

use bytes::Bytes;
use coriolis_ovm_exporter::wire::stream::{Decoder, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, &[u8])| {
    let (chunk, data) = input;
    let chunk = chunk as usize + 1;
    let mut d = Decoder::new();
    let mut disk_size = 0u64;
    let mut prev_end = 0u64;
    let mut data_bytes = 0u64;
    let mut open: Option<(u64, u64, u64)> = None;
    for piece in data.chunks(chunk) {
        let mut input = Bytes::copy_from_slice(piece);
        loop {
            match d.decode(&mut input) {
                Ok(None) => break,
                Err(_) => return,
                Ok(Some(ev)) => match ev {
                    Event::Header(h) => disk_size = h.disk_size,
                    Event::Zero { offset, len } => {
                        assert!(open.is_none() && offset >= prev_end && len > 0);
                        assert!(offset + len <= disk_size);
                        prev_end = offset + len;
                    }
                    Event::DataStart { offset, len } => {
                        assert!(open.is_none() && offset >= prev_end && len > 0);
                        assert!(offset + len <= disk_size);
                        prev_end = offset + len;
                        open = Some((offset, len, 0));
                    }
                    Event::Data { offset, bytes } => {
                        let (o, l, got) = open.as_mut().expect("data inside a record");
                        assert_eq!(offset, *o + *got);
                        *got += bytes.len() as u64;
                        assert!(*got <= *l);
                        data_bytes += bytes.len() as u64;
                    }
                    Event::DataEnd { offset, len } => {
                        assert_eq!(open.take(), Some((offset, len, len)));
                    }
                    Event::End { data_bytes: total, .. } => {
                        assert!(open.is_none());
                        assert_eq!(total, data_bytes);
                    }
                },
            }
        }
    }
    if d.finish().is_ok() {
        assert!(d.is_done() && open.is_none());
    }
});
