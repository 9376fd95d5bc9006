//! The migration wire decoder (`l1_services::migration::wire`): every frame type's payload
//! decoder, the in-place `pages` decoder and the header check, fed two ways: the first byte
//! as a frame type and the rest as its payload, and the whole input as a stream of frames as
//! a link reads it. Nothing may panic; a frame that decodes encodes back to the same bytes
//! (but `error`, whose text is read lossily), and a decoded `pages` frame is consistent.
#![no_main]

use l1_services::migration::wire::{
    self, Frame, BATCH_PAGES, HEADER_LEN, MAX_ERROR_TEXT, PAGE, T_PAGES,
};
use libfuzzer_sys::fuzz_target;

fn ones(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

fn check(ty: u8, payload: &[u8]) {
    let decoded = wire::decode(ty, payload);
    if ty == T_PAGES {
        let pages = wire::decode_pages(payload);
        assert_eq!(pages.is_ok(), decoded.is_ok());
        if let Ok(p) = pages {
            assert!(p.span >= 1 && p.span as u64 <= BATCH_PAGES);
            let words = (p.span as usize).div_ceil(64);
            assert_eq!((p.present.len(), p.zero.len()), (words, words));
            assert!(p.zero.iter().zip(&p.present).all(|(z, q)| z & !q == 0));
            if p.codec == wire::CODEC_RAW {
                assert_eq!(p.data.len(), (ones(&p.present) - ones(&p.zero)) * PAGE);
            } else if p.codec == wire::CODEC_STRIDE {
                // `stride` data: refused, or exactly a pair per progression page and the
                // other data pages raw.
                if let Ok(d) = wire::split_stride(&p) {
                    let data_pages = ones(&p.present) - ones(&p.zero);
                    let n = ones(&d.stride);
                    assert!(n <= data_pages);
                    assert_eq!(d.pairs.len(), n * wire::STRIDE_PAIR);
                    assert_eq!(d.raw.len(), (data_pages - n) * PAGE);
                }
            } else {
                // `cnet` data is variable; its decoder must refuse or fill the pages exactly.
                assert_eq!(p.codec, wire::CODEC_CNET);
                let mut dec = l1_services::migration::cnet::Decoder::default();
                let mut data = p.data;
                let mut page = vec![0u8; PAGE];
                for i in 0..ones(&p.present) - ones(&p.zero) {
                    let mut held = |o: &mut [u8]| -> Result<(), String> {
                        o.fill(0);
                        Ok(())
                    };
                    if dec
                        .decode_page(i as u64, &mut data, &mut held, &mut page)
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    }
    match decoded {
        Ok(Frame::Error(msg)) => {
            assert!(payload.len() <= MAX_ERROR_TEXT && msg.len() <= payload.len() * 3)
        }
        Ok(f) => {
            let mut out = Vec::new();
            wire::encode(&f, &mut out);
            assert_eq!(out[4], ty);
            assert_eq!(&out[HEADER_LEN..], payload, "{f:?} re-encodes differently");
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&ty, payload)) = data.split_first() {
        check(ty, payload);
    }
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let h: &[u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().expect("header");
        let Ok((len, ty)) = wire::header(h) else {
            break;
        };
        let Some(payload) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
            break;
        };
        check(ty, payload);
        rest = &rest[HEADER_LEN + len..];
    }
});
