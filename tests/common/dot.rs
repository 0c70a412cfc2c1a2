//! A checker for DOT source, so the DOT the compiler writes is checked where Graphviz is not
//! installed (rendering with `dot` is tested where it is).

/// A checker for the DOT that `compile --format dot` writes (the subset it uses): `digraph ID {`,
/// then statements `ID [attrs];`, `ID -> ID [attrs];`, `attr=value;`, `node [..];`,
/// `subgraph ID { ... }`, with quoted strings and balanced braces and brackets.
pub fn check(src: &str) -> Result<usize, String> {
    let mut tokens = Vec::new();
    let mut chars = src.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '"' => {
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            closed = true;
                            break;
                        }
                        _ => {}
                    }
                }
                if !closed {
                    return Err(format!("unterminated string at byte {i}"));
                }
                tokens.push("ID".to_string());
            }
            '{' | '}' | '[' | ']' | ';' | ',' | '=' => tokens.push(c.to_string()),
            '-' if chars.peek().is_some_and(|&(_, n)| n == '>') => {
                chars.next();
                tokens.push("->".into());
            }
            c if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' => {
                while chars
                    .peek()
                    .is_some_and(|&(_, n)| n.is_alphanumeric() || n == '_' || n == '.')
                {
                    chars.next();
                }
                tokens.push("ID".into());
            }
            c => return Err(format!("unexpected {c:?} at byte {i}")),
        }
    }
    // digraph ID { stmts }
    let t: Vec<&str> = tokens.iter().map(String::as_str).collect();
    if t.len() < 4 || t[0] != "ID" || t[1] != "ID" || t[2] != "{" || t[t.len() - 1] != "}" {
        return Err(format!(
            "not `digraph NAME {{ ... }}`: {:?}",
            &t[..t.len().min(4)]
        ));
    }
    let mut depth = 0i32;
    let mut edges = 0;
    let mut i = 2;
    while i < t.len() {
        match t[i] {
            "{" => depth += 1,
            "}" => depth -= 1,
            "[" => {
                // attr list: (ID = ID (,|;)?)* ]
                i += 1;
                while t.get(i) != Some(&"]") {
                    if t.get(i) != Some(&"ID")
                        || t.get(i + 1) != Some(&"=")
                        || t.get(i + 2) != Some(&"ID")
                    {
                        return Err(format!("bad attribute list near token {i}"));
                    }
                    i += 3;
                    if matches!(t.get(i), Some(&",") | Some(&";")) {
                        i += 1;
                    }
                }
            }
            "->" => {
                if t.get(i - 1) != Some(&"ID") || t.get(i + 1) != Some(&"ID") {
                    return Err(format!("an edge without two ends near token {i}"));
                }
                edges += 1;
            }
            "ID" | ";" | "=" | "," => {}
            other => return Err(format!("unexpected {other} at token {i}")),
        }
        if depth < 0 {
            return Err("unbalanced braces".into());
        }
        i += 1;
    }
    if depth != 0 {
        return Err("unbalanced braces".into());
    }
    Ok(edges)
}
