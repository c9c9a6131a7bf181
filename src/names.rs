//! Closed sets of names: enums whose variants are stored, counted and shown by a stable
//! string (a bounce class, a suppression reason), with one macro so that the name table,
//! the parser and `Display` can never disagree.

/// `closed_names! { /// doc \n Name { Variant => "name", ... } }` defines the enum with
/// `ALL`, `as_str`, `parse` and `Display`.
macro_rules! closed_names {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)* _ => None }
            }

            /// Dense index for per-name counter arrays.
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use closed_names;
