use super::*;

#[test]
fn placeholder_parse() {
    assert!(Config::parse("[[arms]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\n").is_ok());
}
