//! `#[spanvmm_sdk::service]`: the attribute that takes the boilerplate out of a spanvmm service.
//! Re-exported by `spanvmm-sdk`; see its documentation for the contract. It rewrites one
//! `impl Service for T` block:
//!
//! - `fn attach(&mut self, cfg: MyConfig)` with any type but `&str`: the JSON config is parsed
//!   into it with serde (`spanvmm_sdk::call::config`), a bad config refusing the attach;
//! - functions marked `#[method]` (or `#[method(name = "set-rate")]`) move to an inherent impl
//!   and a generated `call` dispatches to them, decoding typed arguments and encoding the result
//!   as JSON (errors about the call itself are JSON objects);
//! - `#[service(state)]`: `detach` and `resume_from` hand the whole value over as JSON;
//! - the type is exported (`export_service!`) unless `#[service(no_export)]`.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{
    parse_macro_input, FnArg, ImplItem, ImplItemFn, ItemImpl, LitStr, Pat, ReturnType, Type,
};

/// See the crate documentation.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut opts = Options {
        state: false,
        export: true,
    };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("state") {
            opts.state = true;
            Ok(())
        } else if meta.path.is_ident("no_export") {
            opts.export = false;
            Ok(())
        } else {
            Err(meta.error("unknown option: expected `state` or `no_export`"))
        }
    });
    parse_macro_input!(attr with parser);
    let imp = parse_macro_input!(item as ItemImpl);
    expand(opts, imp)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

struct Options {
    /// Generate `detach`/`resume_from` through serde.
    state: bool,
    /// Emit `export_service!(T)`.
    export: bool,
}

/// One `#[method]`.
struct Method {
    /// The name callers use.
    name: String,
    func: ImplItemFn,
}

fn expand(opts: Options, mut imp: ItemImpl) -> syn::Result<TokenStream2> {
    let is_service = imp
        .trait_
        .as_ref()
        .and_then(|(_, p, _)| p.segments.last())
        .is_some_and(|s| s.ident == "Service");
    if !is_service {
        return Err(syn::Error::new(
            imp.span(),
            "#[spanvmm_sdk::service] goes on `impl Service for YourType { ... }`",
        ));
    }
    let self_ty = imp.self_ty.clone();
    let mut methods = Vec::new();
    let mut kept = Vec::new();
    let has = |name: &str, items: &[ImplItem]| {
        items
            .iter()
            .any(|i| matches!(i, ImplItem::Fn(f) if f.sig.ident == name))
    };
    let had_call = has("call", &imp.items);
    let had_state = has("detach", &imp.items) || has("resume_from", &imp.items);
    for item in std::mem::take(&mut imp.items) {
        match item {
            ImplItem::Fn(mut f) => {
                if let Some(name) = take_method_attr(&mut f)? {
                    methods.push(Method { name, func: f });
                } else {
                    if f.sig.ident == "attach" {
                        typed_attach(&mut f)?;
                    }
                    kept.push(ImplItem::Fn(f));
                }
            }
            other => kept.push(other),
        }
    }
    imp.items = kept;
    if !methods.is_empty() {
        if had_call {
            return Err(syn::Error::new(
                imp.span(),
                "this impl has both `fn call` and #[method]s: the attribute generates `call` \
                 from the #[method]s; remove one",
            ));
        }
        let call = dispatch(&methods)?;
        imp.items.push(syn::parse2(call)?);
    }
    if opts.state {
        if had_state {
            return Err(syn::Error::new(
                imp.span(),
                "#[service(state)] generates `detach` and `resume_from`; remove yours or the \
                 `state` option",
            ));
        }
        imp.items.push(syn::parse_quote! {
            fn detach(&mut self) -> ::std::vec::Vec<u8> {
                ::spanvmm_sdk::call::save_state(self)
            }
        });
        imp.items.push(syn::parse_quote! {
            fn resume_from(&mut self, state: &[u8]) -> ::std::result::Result<(), ::std::string::String> {
                ::spanvmm_sdk::call::load_state(self, state)
            }
        });
    }
    let funcs = methods.iter().map(|m| &m.func);
    let inherent = (!methods.is_empty()).then(|| {
        quote! {
            impl #self_ty {
                #(#funcs)*
            }
        }
    });
    let export = opts
        .export
        .then(|| quote! { ::spanvmm_sdk::export_service!(#self_ty); });
    Ok(quote! {
        #imp
        #inherent
        #export
    })
}

/// Removes `#[method]` / `#[method(name = "...")]` from `f`, returning the call name.
fn take_method_attr(f: &mut ImplItemFn) -> syn::Result<Option<String>> {
    let Some(pos) = f.attrs.iter().position(|a| a.path().is_ident("method")) else {
        return Ok(None);
    };
    let attr = f.attrs.remove(pos);
    let mut name = f.sig.ident.to_string();
    if !matches!(attr.meta, syn::Meta::Path(_)) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                name = meta.value()?.parse::<LitStr>()?.value();
                Ok(())
            } else {
                Err(meta.error("expected `name = \"...\"`"))
            }
        })?;
    }
    Ok(Some(name))
}

/// `fn attach(&mut self, cfg: T)` with `T` not `&str` becomes a `&str` attach that parses `T`.
fn typed_attach(f: &mut ImplItemFn) -> syn::Result<()> {
    let Some(FnArg::Typed(arg)) = f.sig.inputs.iter().nth(1).cloned() else {
        return Ok(());
    };
    if is_str_ref(&arg.ty) {
        return Ok(());
    }
    let (pat, ty) = (&arg.pat, &arg.ty);
    let raw: FnArg = syn::parse_quote!(__spanvmm_config: &str);
    f.sig.inputs[1] = raw;
    let body = &f.block;
    f.block = syn::parse_quote_spanned! {ty.span()=> {
        let #pat: #ty = ::spanvmm_sdk::call::config(__spanvmm_config)?;
        #body
    }};
    Ok(())
}

fn is_str_ref(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) => matches!(&*r.elem, Type::Path(p) if p.path.is_ident("str")),
        _ => false,
    }
}

/// Whether a return type is a `Result` (the error is the call's error).
fn returns_result(ret: &ReturnType) -> bool {
    match ret {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    }
}

/// The generated `call`.
fn dispatch(methods: &[Method]) -> syn::Result<TokenStream2> {
    let mut arms = Vec::new();
    let names: Vec<&str> = methods.iter().map(|m| m.name.as_str()).collect();
    for m in methods {
        let f = &m.func;
        let ident = &f.sig.ident;
        match f.sig.inputs.first() {
            Some(FnArg::Receiver(r)) if r.reference.is_some() => {}
            _ => {
                return Err(syn::Error::new(
                    f.sig.span(),
                    "a #[method] takes `&self` or `&mut self` first",
                ))
            }
        }
        let mut params = Vec::new();
        for arg in f.sig.inputs.iter().skip(1) {
            let FnArg::Typed(t) = arg else { continue };
            let Pat::Ident(pi) = &*t.pat else {
                return Err(syn::Error::new(
                    t.pat.span(),
                    "a #[method]'s parameters are plain names (callers pass them by name)",
                ));
            };
            params.push((pi.ident.to_string(), (*t.ty).clone()));
        }
        let sig_text = format!(
            "{}({})",
            m.name,
            params
                .iter()
                .map(|(n, t)| format!("{n}: {}", t.to_token_stream().to_string().replace(' ', "")))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let count = params.len();
        let param_names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let lets = params.iter().enumerate().map(|(i, (n, ty))| {
            let var = syn::Ident::new(&format!("__spanvmm_arg{i}"), ty.span());
            quote_spanned! {ty.span()=> let #var: #ty = __spanvmm_args.get(#i, #n)?; }
        });
        let vars = (0..count).map(|i| syn::Ident::new(&format!("__spanvmm_arg{i}"), f.span()));
        let invoke = quote! { Self::#ident(self, #(#vars),*) };
        let answer = if returns_result(&f.sig.output) {
            quote! { ::spanvmm_sdk::call::answer_result(#invoke) }
        } else {
            quote! { ::spanvmm_sdk::call::answer(&#invoke) }
        };
        let name = &m.name;
        arms.push(quote! {
            #name => {
                let __spanvmm_args = ::spanvmm_sdk::call::Args::parse(
                    __spanvmm_method, #sig_text, &[#(#param_names),*], __spanvmm_raw,
                )?;
                #(#lets)*
                #answer
            }
        });
    }
    Ok(quote! {
        fn call(
            &mut self,
            __spanvmm_method: &str,
            __spanvmm_raw: &str,
        ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
            match __spanvmm_method {
                #(#arms)*
                _ => ::std::result::Result::Err(
                    ::spanvmm_sdk::call::unknown_method(__spanvmm_method, &[#(#names),*]),
                ),
            }
        }
    })
}
