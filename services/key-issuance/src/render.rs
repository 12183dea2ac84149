//! Notification text: a template's `{{Placeholder}}`s replaced by a class's
//! event key and details. The template is parsed before anything is looked
//! up, so an unknown placeholder fails fast and names itself.

use crate::error::Error;
use trainingkeys_shared::InvalidField;

/// A placeholder this service fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// The class's event key code.
    EventTrainingKey,
    /// The class title.
    ClassTitle,
    /// The class start.
    ClassStart,
    /// The class end.
    ClassEnd,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "EventTrainingKey" => Some(Self::EventTrainingKey),
            "ClassTitle" => Some(Self::ClassTitle),
            "ClassStart" => Some(Self::ClassStart),
            "ClassEnd" => Some(Self::ClassEnd),
            _ => None,
        }
    }
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Literal text.
    Text(&'a str),
    /// A placeholder to fill.
    Fill(Placeholder),
}

/// Splits a template into text and placeholders (`{{Name}}`, spaces inside
/// the braces allowed). Unknown names: [`Error::UnknownPlaceholder`]; a `{{`
/// without `}}`: an invalid `template`.
pub fn parse(template: &str) -> Result<Vec<Piece<'_>>, Error> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| InvalidField::new("template", "has a {{ without a closing }}"))?;
        let name = after[..close].trim();
        let placeholder =
            Placeholder::parse(name).ok_or_else(|| Error::UnknownPlaceholder(name.to_owned()))?;
        pieces.push(Piece::Fill(placeholder));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// True when the template uses the placeholder.
pub fn uses(pieces: &[Piece<'_>], placeholder: Placeholder) -> bool {
    pieces.contains(&Piece::Fill(placeholder))
}

/// The text with every placeholder replaced by `value(placeholder)`.
pub fn render(pieces: &[Piece<'_>], value: impl Fn(Placeholder) -> String) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Fill(p) => out.push_str(&value(*p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    proptest::proptest! {
        /// Any template parses or is refused with an error, never a panic;
        /// rendering what parsed keeps its literal text.
        #[test]
        fn any_template_parses_or_is_refused(template in "\\PC{0,200}|[{} a-zA-Z]{0,60}") {
            if let Ok(pieces) = parse(&template) {
                let text = render(&pieces, |_| String::new());
                proptest::prop_assert!(text.len() <= template.len());
            }
        }
    }

    #[test]
    fn fills_known_placeholders() {
        let pieces = parse("Hi! Key {{EventTrainingKey}} for {{ ClassTitle }}.").unwrap();
        assert!(uses(&pieces, Placeholder::EventTrainingKey));
        let text = render(&pieces, |p| format!("<{p:?}>"));
        assert_eq!(text, "Hi! Key <EventTrainingKey> for <ClassTitle>.");
        assert_eq!(render(&parse("").unwrap(), |_| String::new()), "");
    }

    #[test]
    fn rejects_unknown_and_unclosed() {
        match parse("a {{Nope}} b") {
            Err(Error::UnknownPlaceholder(name)) => assert_eq!(name, "Nope"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("a {{ClassTitle"),
            Err(Error::InvalidField(_))
        ));
    }
}
