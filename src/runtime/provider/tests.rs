use super::*;

#[test]
fn parses_cli_names() {
    assert_eq!("cpu".parse::<ExecutionProvider>().unwrap(), ExecutionProvider::Cpu);
    assert_eq!("cuda:1".parse::<ExecutionProvider>().unwrap(), ExecutionProvider::cuda(1));
    assert_eq!("tensorrt".parse::<ExecutionProvider>().unwrap(), ExecutionProvider::TensorRt(TensorRtOptions::new(0)));
    assert!(matches!("vulkan".parse::<ExecutionProvider>(), Err(Error::InvalidRequest { .. })));
    assert!(matches!("cuda:-1".parse::<ExecutionProvider>(), Err(Error::InvalidRequest { .. })));
}
