"""An Ollama Modelfile whose TEMPLATE renders conversations exactly as training's chat template did.

Ollama templates are Go templates, not Jinja, so the training template is not copied but measured: it is rendered
on conversations of marker strings, and the text around each marker gives each role's prefix and suffix, the
generation prompt, and what opens a conversation that has no system prompt (a default one, say). The result is
checked by rendering longer conversations both ways; a template that is not a plain per-role wrapper (one that
folds the system prompt into the first user turn, say) is refused rather than approximated, because a template
that differs from training's is what makes an exported model "get worse".
"""

from __future__ import annotations

from dataclasses import dataclass

from loralab.data.templates import render
from loralab.errors import LoralabError

S, U1, A1, U2, A2 = "\x01system\x01", "\x01user one\x01", "\x01answer one\x01", "\x01user two\x01", "\x01answer two\x01"


@dataclass
class RoleWrappers:
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    generation_prompt: str  # what opens an assistant turn
    assistant_suffix: str
    first_user_prefix: str  # before a conversation's first message when it is the user's (a default system prompt)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as the Go template below renders it (to check against the Jinja template)."""
        text = ""
        for i, m in enumerate(messages):
            if m["role"] == "system":
                text += self.system_prefix + m["content"] + self.system_suffix
            elif m["role"] == "user":
                text += (self.first_user_prefix if i == 0 else self.user_prefix) + m["content"] + self.user_suffix
            else:
                text += self.generation_prompt + m["content"] + self.assistant_suffix
        return text + (self.generation_prompt if add_generation_prompt else "")


def _refuse(reason: str) -> LoralabError:
    return LoralabError(f"the training chat template cannot be written as an Ollama template: {reason}",
                        field="data.template", fix="export with --format gguf and write the Modelfile's TEMPLATE by "
                                                   "hand, or train with a per-role template (chatml, qwen, llama3)")


def role_wrappers(tokenizer, template: str) -> RoleWrappers:
    def r(messages, gen=False):
        text = render(tokenizer, template, [{"role": role, "content": c} for role, c in messages], gen)
        bos = tokenizer.bos_token or ""
        return text[len(bos):] if bos and text.startswith(bos) else text  # llama.cpp adds BOS itself

    full = r([("system", S), ("user", U1), ("assistant", A1)])
    to_user = r([("system", S), ("user", U1)])
    prompt = r([("system", S), ("user", U1)], gen=True)
    longer = r([("system", S), ("user", U1), ("assistant", A1), ("user", U2)])
    alone = r([("user", U1)])
    if not all(m in full for m in (S, U1, A1)) or not prompt.startswith(to_user) or U2 not in longer \
            or U1 not in alone:
        raise _refuse("it does not render each message once, in order")
    user_suffix = to_user[to_user.index(U1) + len(U1):]
    assistant_suffix = full[full.index(A1) + len(A1):]
    between = longer[longer.index(A1) + len(A1):longer.index(U2)]
    if not between.startswith(assistant_suffix):
        raise _refuse("an assistant turn ends differently when more turns follow")
    user_prefix = between[len(assistant_suffix):]
    after_system = full[full.index(S) + len(S):full.index(U1)]
    if not after_system.endswith(user_prefix):
        raise _refuse("the user turn after the system prompt opens differently from later ones")
    wrappers = RoleWrappers(full[:full.index(S)], after_system[:len(after_system) - len(user_prefix)], user_prefix,
                            user_suffix, prompt[len(to_user):], assistant_suffix, alone[:alone.index(U1)])
    for messages in ([("system", S), ("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2)],
                     [("system", S), ("user", U1), ("assistant", A1), ("user", U2)],
                     [("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2)],
                     [("user", U1), ("assistant", A1), ("user", U2)]):
        as_dicts = [{"role": role, "content": c} for role, c in messages]
        for gen in (False, True):
            if wrappers.render(as_dicts, gen) != r(messages, gen):
                raise _refuse("a multi-turn conversation renders differently from its per-role pieces")
    return wrappers


def go_template(w: RoleWrappers) -> str:
    """The Go template for Ollama: each message wrapped by role, then the generation prompt after a last user turn.
    Written on one line with no trim markers, so no newline of the wrappers is lost."""
    return ('{{ range $i, $_ := .Messages }}{{ if eq .Role "system" }}' + w.system_prefix + "{{ .Content }}"
            + w.system_suffix + '{{ else if eq .Role "user" }}{{ if eq $i 0 }}' + w.first_user_prefix
            + "{{ else }}" + w.user_prefix + "{{ end }}{{ .Content }}" + w.user_suffix
            + "{{ if eq (len (slice $.Messages $i)) 1 }}" + w.generation_prompt + '{{ end }}{{ else if eq .Role '
            '"assistant" }}' + w.generation_prompt + "{{ .Content }}" + w.assistant_suffix + "{{ end }}{{ end }}")


def modelfile(gguf_name: str, tokenizer, template: str, system: str | None) -> str:
    w = role_wrappers(tokenizer, template)
    body = go_template(w)
    if '"""' in body:
        raise _refuse('it contains """, which a Modelfile cannot quote')
    stops = [t for t in (w.assistant_suffix.strip(), tokenizer.eos_token) if t]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
