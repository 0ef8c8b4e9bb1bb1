//! The inverse of `arbitrary`'s decoding, for writing seeds as op lists:
//! each type encodes into the bytes its derived `Arbitrary` impl turns back
//! into the same value. Round trips are tested in `seeds`, so a change of
//! `arbitrary`'s format shows up as a test failure, not as stale seeds.

/// A value that can be written as the input bytes `arbitrary` decodes it
/// from.
pub trait Encode {
    /// Appends the encoding of `self`.
    fn encode(&self, out: &mut Vec<u8>);
}

/// Encodes variant `index` of an enum with `count` variants: derived
/// `Arbitrary` reads a u32 `x` and picks `(x * count) >> 32`.
pub fn variant(out: &mut Vec<u8>, index: u32, count: u32) {
    let x = (u64::from(index) << 32).div_ceil(u64::from(count)) as u32;
    out.extend_from_slice(&x.to_le_bytes());
}

/// Encodes a whole input decoded with `arbitrary_take_rest` as a list:
/// each element is preceded by a "keep going" byte, and a 0 ends the list.
pub fn encode_list<T: Encode>(out: &mut Vec<u8>, items: &[T]) {
    for item in items {
        out.push(1);
        item.encode(out);
    }
    out.push(0);
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}

encode_int!(u8, u16, u32, u64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode(out);
            }
        }
    }
}

impl<A: Encode, B: Encode> Encode for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
}

/// A `Vec` that is not the last field of the input: `arbitrary_iter`, the
/// same "keep going" bytes as [`encode_list`].
impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_list(out, self);
    }
}

/// Implements [`Encode`] for a struct by encoding its fields in order.
#[macro_export]
macro_rules! encode_struct {
    ($t:ty { $($field:ident),* $(,)? }) => {
        impl $crate::encode::Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                $( $crate::encode::Encode::encode(&self.$field, out); )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use arbitrary::{Arbitrary, Unstructured};

    use super::*;

    #[derive(Arbitrary, Debug, PartialEq)]
    enum Three {
        A,
        B(u16),
        C { x: bool, y: Option<u8> },
    }

    impl Encode for Three {
        fn encode(&self, out: &mut Vec<u8>) {
            match self {
                Three::A => variant(out, 0, 3),
                Three::B(v) => {
                    variant(out, 1, 3);
                    v.encode(out);
                }
                Three::C { x, y } => {
                    variant(out, 2, 3);
                    x.encode(out);
                    y.encode(out);
                }
            }
        }
    }

    #[test]
    fn round_trips() {
        let values = vec![
            Three::A,
            Three::B(0xbeef),
            Three::C { x: true, y: None },
            Three::C {
                x: false,
                y: Some(7),
            },
        ];
        let mut out = Vec::new();
        encode_list(&mut out, &values);
        let decoded = Vec::<Three>::arbitrary_take_rest(Unstructured::new(&out)).unwrap();
        assert_eq!(decoded, values);
        let nested = vec![vec![1u8, 2], vec![]];
        let mut out = Vec::new();
        nested.encode(&mut out);
        let mut u = Unstructured::new(&out);
        assert_eq!(Vec::<Vec<u8>>::arbitrary(&mut u).unwrap(), nested);
    }
}
