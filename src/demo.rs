pub fn run(_files: usize, _keep: bool) -> Result<i32, String> {
    Err("demo: not built yet".into())
}
