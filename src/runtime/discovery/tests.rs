use super::*;

#[test]
fn explicit_missing_path_is_an_error_naming_it_and_the_fix() {
    let err = find_library(Some(Path::new("/definitely/not/here/libonnxruntime.so"))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::RuntimeNotFound { .. }));
    assert!(msg.contains("/definitely/not/here/libonnxruntime.so"), "{msg}");
    // The fix is for a user of the crate, not for someone inside this repository.
    for fix in ["ORT_DYLIB_PATH", "onnxruntime_library", "pip install onnxruntime", "ort-download-binaries"] {
        assert!(msg.contains(fix), "{fix} missing from: {msg}");
    }
    assert!(!msg.contains("scripts/setup-ort.sh"), "{msg}");
}

#[test]
fn an_explicit_path_wins_over_ort_dylib_path() {
    // Whatever ORT_DYLIB_PATH says (the test scripts set it), an explicit path that exists is the answer.
    let here = std::env::current_exe().unwrap();
    assert_eq!(find_library(Some(&here)).unwrap(), std::fs::canonicalize(&here).unwrap());
}
