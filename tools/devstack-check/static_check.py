"""Static checks of the rapid-vmm devstack plugin.

Usage: static_check.py <plugin-dir>  (the directory of settings, plugin.sh)

1. Every variable the plugin reads is assigned in devstack/settings,
   devstack/plugin.sh or devstack/lib/*, is read with a default
   (``${X:-...}``, ``${X-...}``, ``${X:+...}``, ``${X:=...}``), or is one
   that devstack (or bash) sets, from the explicit allow-list below.
   Allow-list entries that the plugin no longer reads are errors too, so the
   list stays exact.
2. Every ``RAPID_VMM_*`` variable the settings assign keeps a value set in
   local.conf: ``RAPID_VMM_X=${RAPID_VMM_X:-default}`` (or devstack's
   ``$(trueorfalse default RAPID_VMM_X)`` for booleans).
3. No shell redirection writes a file (only ``/dev/null`` and file
   descriptors are allowed): every write goes through a devstack function or
   a command, which the dry run intercepts and confines to its sandbox.

Prints one line per problem and exits 1 if there is any.
"""

import dataclasses
import os
import re
import sys

# Variables devstack (or bash) sets before the plugin runs, and why the
# plugin may read them without a default.
DEVSTACK_VARIABLES = {
    # stackrc
    'DEST': 'stackrc: where devstack clones the projects (/opt/stack)',
    'DATA_DIR': 'stackrc: ${DEST}/data, state directories of services',
    'STACK_USER': 'stackrc: the user the services run as',
    'HOST_IP': 'stackrc: the IP of this host (get_default_host_ip)',
    'REGION_NAME': 'stackrc: the keystone region (RegionOne)',
    'ENABLE_DEBUG_LOG_LEVEL': 'stackrc: the [DEFAULT] debug of services',
    'DEFAULT_IMAGE_NAME': 'stackrc: the image devstack uploads to Glance',
    'PRIVATE_NETWORK_NAME': 'stackrc: the tenant network ("private")',
    'CIRROS_VERSION': 'stackrc: the CirrOS release of the default image',
    'CIRROS_ARCH': 'stackrc: the CirrOS architecture ($(uname -m))',
    'PYTHON': 'stackrc and inc/python: the python3 devstack installs '
              'into (the global virtualenv\'s with GLOBAL_VENV)',
    # stack.sh
    'ADMIN_PASSWORD': 'stack.sh read_password: keystone admin password '
                      '(read at configure time only: it is asked after '
                      'the plugin settings are sourced)',
    'SERVICE_PASSWORD': 'stack.sh read_password: service users password '
                        '(same caveat)',
    # lib/keystone
    'SERVICE_PROJECT_NAME': 'lib/keystone: the service project ("service")',
    'SERVICE_DOMAIN_NAME': 'lib/keystone: the service domain ("Default")',
    'KEYSTONE_SERVICE_URI': 'lib/keystone: the public identity endpoint',
    # lib/tls
    'SSL_BUNDLE_FILE': 'lib/tls: CA bundle when tls-proxy is enabled',
    # functions (stackrc's LOG_COLOR is read by setup_logging, not us)
    # bash
    'LINENO': 'bash: the current line, for die',
    'HOSTNAME': 'bash: the host name (default RPC server name)',
}

# Variables that bash or the positional parameters provide
SPECIAL = set('0123456789@*#?-$!_')

NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')

ASSIGNMENT_PATTERNS = (
    # X=..., X+=..., X[i]=...
    re.compile(r'(?:^|[\s;&|(!{])([A-Za-z_][A-Za-z0-9_]*)'
               r'(?:\[[^\]\s]*\])?\+?='),
    # for X in
    re.compile(r'\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b'),
)
DECLARATION = re.compile(
    r'\b(?:local|export|declare|readonly|typeset)((?:[ \t]+-[A-Za-z]+)*)'
    r'((?:[ \t]+[A-Za-z_][A-Za-z0-9_]*(?:=\S*)?)+)')
READ = re.compile(r'\bread((?:[ \t]+-[A-Za-z]+)*)((?:[ \t]+[A-Za-z_]'
                  r'[A-Za-z0-9_]*)+)')
SETTINGS_DEFAULT = re.compile(
    r'^\s*(RAPID_VMM_[A-Z0-9_]+)=(.*)$')


@dataclasses.dataclass
class Read:
    name: str
    defaulted: bool
    path: str
    line: int


@dataclasses.dataclass
class Redirection:
    target: str
    path: str
    line: int


class Lexer:
    """A small lexer for the bash the plugin is written in.

    It finds parameter expansions (outside single quotes), redirections and
    gives a skeleton of the text where quoted strings and comments are
    blanked, for the assignment patterns.
    """

    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path
        self.reads: list[Read] = []
        self.redirections: list[Redirection] = []
        self.skeleton: list[str] = []
        self.errors: list[str] = []

    def line_of(self, pos: int) -> int:
        return self.text.count('\n', 0, pos) + 1

    def run(self) -> 'Lexer':
        self._code(0, top=True)
        return self

    def _blank(self, segment: str) -> str:
        return ''.join('\n' if c == '\n' else ' ' for c in segment)

    def _code(self, pos: int, top: bool = False, closer: str = '') -> int:
        """Unquoted code until ``closer`` (``)`` of a substitution)."""
        text = self.text
        depth = 0
        word_start = True
        while pos < len(text):
            c = text[pos]
            if closer and c == ')' and depth == 0:
                self.skeleton.append(c)
                return pos + 1
            if c == '(':
                depth += 1
            elif c == ')':
                depth -= 1
            if c == '#' and word_start:
                end = text.find('\n', pos)
                end = len(text) if end < 0 else end
                self.skeleton.append(self._blank(text[pos:end]))
                pos = end
                continue
            if c == '\\':
                self.skeleton.append(self._blank(text[pos:pos + 2]))
                pos += 2
                word_start = False
                continue
            if c == "'":
                end = text.find("'", pos + 1)
                end = len(text) if end < 0 else end
                self.skeleton.append(' ' + self._blank(text[pos + 1:end])
                                     + ' ')
                pos = end + 1
                word_start = False
                continue
            if c == '"':
                self.skeleton.append(' ')
                pos = self._double(pos + 1)
                self.skeleton.append(' ')
                word_start = False
                continue
            if c == '$':
                pos = self._dollar(pos)
                word_start = False
                continue
            if c == '`':
                self.errors.append(f'{self.path}:{self.line_of(pos)}: '
                                   'use $(...) rather than backquotes')
            if c == '<' and text.startswith('<<', pos) and \
                    not text.startswith('<<<', pos):
                self.errors.append(f'{self.path}:{self.line_of(pos)}: '
                                   'here-documents are not checked: avoid '
                                   'them')
            if c == '>':
                pos = self._redirection(pos)
                word_start = True
                continue
            self.skeleton.append(c)
            word_start = c in ' \t\n;&|(){}'
            pos += 1
        return pos

    def _redirection(self, pos: int) -> int:
        text = self.text
        start = pos
        pos += 1
        if pos < len(text) and text[pos] in '>|':
            pos += 1
        if pos < len(text) and text[pos] == '&':
            # >&2, 2>&1: a descriptor, not a file
            pos += 1
            match = re.compile(r'\d+|-').match(text, pos)
            end = match.end() if match else pos
            self.skeleton.append(self._blank(text[start:end]))
            return end
        while pos < len(text) and text[pos] in ' \t':
            pos += 1
        match = re.compile(r'(?:"[^"]*"|\'[^\']*\'|[^\s;&|)])+').match(
            text, pos)
        target = match.group(0) if match else ''
        end = match.end() if match else pos
        if target.strip('"\'') != '/dev/null':
            self.redirections.append(
                Redirection(target, self.path, self.line_of(start)))
        # the target's expansions are still reads
        inner = Lexer(target, self.path)
        inner.run()
        for read in inner.reads:
            read.line = self.line_of(start)
            self.reads.append(read)
        self.skeleton.append(self._blank(text[start:end]))
        return end

    def _double(self, pos: int) -> int:
        """Inside double quotes, after the opening quote."""
        text = self.text
        while pos < len(text):
            c = text[pos]
            if c == '"':
                return pos + 1
            if c == '\\':
                self.skeleton.append('  ')
                pos += 2
                continue
            if c == '$':
                pos = self._dollar(pos)
                continue
            self.skeleton.append('\n' if c == '\n' else ' ')
            pos += 1
        return pos

    def _dollar(self, pos: int) -> int:
        text = self.text
        nxt = text[pos + 1] if pos + 1 < len(text) else ''
        if nxt == '(':
            if text.startswith('$((', pos):
                end = text.find('))', pos)
                self.skeleton.append(self._blank(text[pos:end + 2]))
                for name in NAME.findall(text[pos + 3:end]):
                    self.reads.append(Read(name, False, self.path,
                                           self.line_of(pos)))
                return end + 2
            self.skeleton.append('$(')
            return self._code(pos + 2, closer=')')
        if nxt == "'":
            # $'...' ANSI-C string
            end = pos + 2
            while end < len(text) and text[end] != "'":
                end += 2 if text[end] == '\\' else 1
            self.skeleton.append(self._blank(text[pos:end + 1]))
            return end + 1
        if nxt == '{':
            end = self._brace_end(pos + 2)
            self._braced(text[pos + 2:end], pos)
            self.skeleton.append(self._blank(text[pos:end + 1]))
            return end + 1
        if nxt in SPECIAL:
            self.skeleton.append('  ')
            return pos + 2
        match = NAME.match(text, pos + 1)
        if match:
            self.reads.append(Read(match.group(0), False, self.path,
                                   self.line_of(pos)))
            self.skeleton.append(self._blank(match.group(0)) + ' ')
            return match.end()
        self.skeleton.append('$')
        return pos + 1

    def _brace_end(self, pos: int) -> int:
        depth = 1
        text = self.text
        while pos < len(text):
            if text[pos] == '\\':
                pos += 2
                continue
            if text.startswith('${', pos):
                depth += 1
                pos += 2
                continue
            if text[pos] == '}':
                depth -= 1
                if depth == 0:
                    return pos
            pos += 1
        self.errors.append(f'{self.path}:{self.line_of(pos)}: unclosed ${{')
        return len(text)

    def _braced(self, body: str, pos: int) -> None:
        line = self.line_of(pos)
        if body[:1] in ('!', '#') and len(body) > 1 and \
                NAME.match(body, 1):
            body = body[1:]
        match = NAME.match(body)
        if not match:
            if body[:1] not in SPECIAL:
                self.errors.append(f'{self.path}:{line}: cannot parse '
                                   f'${{{body}}}')
            return
        name = match.group(0)
        rest = body[match.end():]
        if rest.startswith('['):
            rest = rest[rest.find(']') + 1:]
        defaulted = bool(re.match(r':?[-=+?]', rest))
        self.reads.append(Read(name, defaulted, self.path, line))
        # the operand (default, pattern, replacement) may expand more
        operand = Lexer('"' + rest + '"', self.path)
        operand.run()
        for read in operand.reads:
            read.line = line
            self.reads.append(read)


def plugin_files(plugin_dir: str) -> list[str]:
    files = [os.path.join(plugin_dir, name)
             for name in ('settings', 'plugin.sh', 'override-defaults')]
    lib = os.path.join(plugin_dir, 'lib')
    if os.path.isdir(lib):
        files += [os.path.join(lib, name) for name in sorted(os.listdir(lib))]
    return [path for path in files if os.path.isfile(path)]


def assigned_names(skeleton: str) -> set[str]:
    names = set()
    for pattern in ASSIGNMENT_PATTERNS:
        names.update(pattern.findall(skeleton))
    for _flags, declared in DECLARATION.findall(skeleton):
        for item in declared.split():
            names.add(item.split('=', 1)[0])
    for _flags, variables in READ.findall(skeleton):
        names.update(variables.split())
    return names


def check_settings_defaults(path: str, text: str) -> list[str]:
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        match = SETTINGS_DEFAULT.match(line)
        if not match:
            continue
        name, value = match.groups()
        defaulted = (value.startswith('${' + name + ':-') or
                     re.fullmatch(r'\$\(trueorfalse \w+ ' + name + r'\)',
                                  value))
        if not defaulted:
            problems.append(
                f'{path}:{number}: {name} must keep a value from local.conf:'
                f' write {name}=${{{name}:-<default>}}')
    return problems


def check(plugin_dir: str) -> list[str]:
    problems: list[str] = []
    files = plugin_files(plugin_dir)
    for required in ('settings', 'plugin.sh'):
        if not os.path.isfile(os.path.join(plugin_dir, required)):
            problems.append(f'{plugin_dir}: no {required}')
    reads: list[Read] = []
    assigned: set[str] = set()
    for path in files:
        with open(path, encoding='utf-8') as handle:
            text = handle.read()
        lexer = Lexer(text, path).run()
        problems += lexer.errors
        reads += lexer.reads
        assigned |= assigned_names(''.join(lexer.skeleton))
        for redirection in lexer.redirections:
            problems.append(
                f'{redirection.path}:{redirection.line}: redirection to '
                f'{redirection.target!r}: write files with a devstack '
                'function or a command (sudo install, cp, iniset...), so the '
                'dry run can confine them')
        if os.path.basename(path) == 'settings':
            problems += check_settings_defaults(path, text)

    used_allowed = set()
    for read in reads:
        if read.name in assigned or read.defaulted:
            continue
        if read.name in DEVSTACK_VARIABLES:
            used_allowed.add(read.name)
            continue
        problems.append(
            f'{read.path}:{read.line}: ${read.name} is read but neither '
            'assigned by the plugin, given a default (${X:-...}) nor a '
            'devstack variable of the allow-list in '
            'tools/devstack-check/static_check.py')
    for name in sorted(set(DEVSTACK_VARIABLES) - used_allowed):
        if not any(read.name == name for read in reads):
            problems.append(
                f'allow-list entry {name} is not read by the plugin any '
                'more: remove it from tools/devstack-check/static_check.py')
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    problems = check(argv[1])
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f'static checks of {argv[1]}: ok')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
