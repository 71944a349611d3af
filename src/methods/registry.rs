//! The method registry's macro. `methods/mod.rs` invokes it with one line per method: its
//! variant, the name plans, manifests and the CLI use, its file, and `+ params FIELD` when the
//! method has parameters (a `Params` struct in its file). From these lines it declares each
//! method's module and generates the [`MethodKind`] enum (serde and clap), the lookup of each
//! method's [`Spec`](super::Spec), and [`MethodParams`], the plan's `[params]` table and
//! `adapt`'s flags: every method's `Params` side by side, flattened.
//!
//! Adding a method: write `src/methods/<name>.rs` with a `pub const SPEC: Spec` (and a
//! `Params` struct if it has parameters) and add its line to the list in `methods/mod.rs`.
//! No code outside `methods` branches on the method: it reads the `Spec` and calls the `Method`.

use super::{Method, MethodKind, MethodParams};

macro_rules! registry {
    ( $( $(#[doc = $doc:literal])* $variant:ident = $name:literal => $module:ident $(+ params $field:ident)?, )* ) => {
        $( pub mod $module; )*

        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize, ::clap::ValueEnum)]
        pub enum MethodKind {
            $( $(#[doc = $doc])* #[serde(rename = $name)] #[value(name = $name)] $variant, )*
        }

        impl MethodKind {
            /// Every method, in the order tables list them.
            pub const ALL: &'static [MethodKind] = &[ $( MethodKind::$variant, )* ];

            /// The name plans, manifests and the CLI use.
            pub fn name(self) -> &'static str {
                match self { $( MethodKind::$variant => $name, )* }
            }

            /// What the method is, as the runner, the plan and the pack need to know it.
            pub fn spec(self) -> &'static Spec {
                match self { $( MethodKind::$variant => &$module::SPEC, )* }
            }
        }

        /// Method parameters; unset values take the defaults the help text states. The same
        /// fields are the plan file's `[params]` table and `adapt`'s flags.
        #[derive(Clone, Debug, Default, PartialEq, ::serde::Serialize, ::serde::Deserialize, ::clap::Args)]
        #[serde(try_from = "RawParams")]
        pub struct MethodParams {
            $( $( #[serde(flatten)] #[command(flatten)] pub $field: $module::Params, )? )*
        }

        /// `MethodParams` as read, with whatever no method claims: flattened structs cannot
        /// deny unknown fields themselves, so the leftovers are refused in `try_from`.
        #[derive(::serde::Deserialize)]
        struct RawParams {
            $( $( #[serde(flatten)] $field: $module::Params, )? )*
            #[serde(flatten)]
            unknown: std::collections::BTreeMap<String, ::serde::de::IgnoredAny>,
        }

        impl TryFrom<RawParams> for MethodParams {
            type Error = String;
            fn try_from(raw: RawParams) -> Result<MethodParams, String> {
                if let Some(name) = raw.unknown.keys().next() {
                    return Err(format!(
                        "unknown method parameter `{name}` (`mtpack adapt --help` lists them)"
                    ));
                }
                Ok(MethodParams { $( $( $field: raw.$field, )? )* })
            }
        }

        impl MethodParams {
            /// Checks every method's parameters (a plan may set those of other methods too,
            /// so that one file serves a comparison; they must still make sense).
            pub fn validate(&self) -> Result<(), String> {
                $( $( self.$field.validate()?; )? )*
                Ok(())
            }
        }
    };
}

pub(crate) use registry;

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl MethodKind {
    /// Whether training needs the data of earlier tasks.
    pub fn needs_old_data(self) -> bool {
        self.spec().data.tasks == super::Tasks::AllSoFar
    }

    /// Whether tasks see the backbone through per-task weight masks.
    pub fn masked(self) -> bool {
        self.spec().masked
    }

    /// Training settings the method's paper uses where the plan sets none.
    pub fn hyper_defaults(self) -> crate::train::Hyper {
        (self.spec().hyper_defaults)()
    }

    /// The method for a plan, its parameters checked.
    pub fn create(self, params: &MethodParams) -> Result<Box<dyn Method>, String> {
        params.validate()?;
        Ok((self.spec().create)(params))
    }
}

impl MethodParams {
    /// The parameters for `model`: defaults that depend on the backbone filled in by the
    /// method (see each method's `for_backbone`).
    pub fn for_backbone(&self, method: MethodKind, model: &crate::onnx::Model) -> MethodParams {
        let mut p = self.clone();
        (method.spec().for_backbone)(&mut p, super::has_batchnorm(model));
        p
    }

    /// The values in effect for `method`, defaults filled in, for the manifest.
    pub fn effective(&self, method: MethodKind) -> serde_json::Value {
        (method.spec().effective)(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_clap() {
        for &m in MethodKind::ALL {
            let json = serde_json::to_value(m).unwrap();
            assert_eq!(json, m.name());
            assert_eq!(serde_json::from_value::<MethodKind>(json).unwrap(), m);
            assert_eq!(<MethodKind as clap::ValueEnum>::from_str(m.name(), false).unwrap(), m);
        }
    }

    #[test]
    fn params_refuse_unknown_keys_and_keep_their_flat_form() {
        let err = serde_json::from_str::<MethodParams>(r#"{"lwf_lambda": 2, "lwf_lamda": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown method parameter `lwf_lamda`"), "{err}");
        let p: MethodParams = serde_json::from_str(r#"{"lwf_lambda": 2, "packnet_prune": 0.5}"#).unwrap();
        assert_eq!(p.lwf.lwf_lambda, Some(2.0));
        assert_eq!(p.packnet.packnet_prune, Some(0.5));
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back, serde_json::json!({"lwf_lambda": 2.0, "packnet_prune": 0.5}));
        let toml: MethodParams = toml::from_str("ewc_lambda = 100\newc_fisher = \"empirical\"").unwrap();
        assert_eq!(toml.ewc.ewc_lambda, Some(100.0));
    }
}
