#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sd3_onnx_fuzz::request(data));
