use super::*;

#[test]
fn explicit_missing_path_is_an_error_naming_it() {
    let err = find_library(Some(Path::new("/definitely/not/here/libonnxruntime.so"))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::RuntimeNotFound { .. }));
    assert!(msg.contains("/definitely/not/here/libonnxruntime.so"), "{msg}");
    assert!(msg.contains("scripts/setup-ort.sh"), "{msg}");
}
