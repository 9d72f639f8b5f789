/**
 * Typing on the guest's PS/2 keyboard: one US-layout scancode map (set 1, what v86's i8042 controller passes to
 * the guest) for `qcow86 boot --send-keys`, the library's `sendKeys` and the tab's Screen view. Text becomes
 * key presses the way a person would type it (Shift for capitals and symbols), so a guest that reads scancodes -
 * a BIOS menu, a boot loader, the Linux console - sees real keys. v86's own `keyboard_send_text` needs its
 * keyboard adapter, which a machine without a page (Node, the tab's Worker) does not have.
 *
 * Key syntax (sendKeys and --send-keys): plain characters are typed; `\n` (a newline, or backslash-n) is Enter;
 * `<Name>` is a named key (`<Enter> <Esc> <Tab> <Backspace> <Up> <Down> <Left> <Right> <Home> <End> <PgUp>
 * <PgDn> <Insert> <Delete> <Space> <F1>`..`<F12>`); modifiers prefix a key or a character: `<Ctrl-X>`,
 * `<Alt-F2>`, `<Shift-Tab>`, `<Ctrl-Alt-Delete>`; `<<` is a literal `<`. Backslash escapes: `\n` Enter, `\t` Tab,
 * `\e` Esc, `\\` a backslash.
 */

/** A modifier's make code. */
const MODIFIERS = { Ctrl: [0x1d], Alt: [0x38], Shift: [0x2a] } as const;
type Modifier = keyof typeof MODIFIERS;

/** Named keys: make codes (0xe0 first for the extended keys). Names are matched case-insensitively. */
const NAMED: Record<string, number[]> = {
  Enter: [0x1c], Esc: [0x01], Tab: [0x0f], Backspace: [0x0e], Space: [0x39],
  Up: [0xe0, 0x48], Down: [0xe0, 0x50], Left: [0xe0, 0x4b], Right: [0xe0, 0x4d],
  Home: [0xe0, 0x47], End: [0xe0, 0x4f], PgUp: [0xe0, 0x49], PgDn: [0xe0, 0x51],
  Insert: [0xe0, 0x52], Delete: [0xe0, 0x53],
  F1: [0x3b], F2: [0x3c], F3: [0x3d], F4: [0x3e], F5: [0x3f], F6: [0x40], F7: [0x41], F8: [0x42], F9: [0x43], F10: [0x44],
  F11: [0x57], F12: [0x58],
};
/** Other spellings people use for the same keys (and the browser's KeyboardEvent.key names). */
const ALIASES: Record<string, string> = {
  Return: 'Enter', Escape: 'Esc', Del: 'Delete', Ins: 'Insert', PageUp: 'PgUp', PageDown: 'PgDn',
  ArrowUp: 'Up', ArrowDown: 'Down', ArrowLeft: 'Left', ArrowRight: 'Right', BS: 'Backspace',
};
const NAMES = new Map<string, string>([
  ...Object.keys(NAMED).map((name) => [name.toLowerCase(), name] as [string, string]),
  ...Object.entries(ALIASES).map(([alias, name]) => [alias.toLowerCase(), name] as [string, string]),
]);

/** US layout: each key's make code with its unshifted and shifted characters. */
const LAYOUT: Array<[number, string, string]> = [
  [0x29, '`', '~'], [0x02, '1', '!'], [0x03, '2', '@'], [0x04, '3', '#'], [0x05, '4', '$'], [0x06, '5', '%'],
  [0x07, '6', '^'], [0x08, '7', '&'], [0x09, '8', '*'], [0x0a, '9', '('], [0x0b, '0', ')'], [0x0c, '-', '_'],
  [0x0d, '=', '+'], [0x1a, '[', '{'], [0x1b, ']', '}'], [0x2b, '\\', '|'], [0x27, ';', ':'], [0x28, "'", '"'],
  [0x33, ',', '<'], [0x34, '.', '>'], [0x35, '/', '?'], [0x39, ' ', ' '],
  ...[...'qwertyuiop'].map((c, i): [number, string, string] => [0x10 + i, c, c.toUpperCase()]),
  ...[...'asdfghjkl'].map((c, i): [number, string, string] => [0x1e + i, c, c.toUpperCase()]),
  ...[...'zxcvbnm'].map((c, i): [number, string, string] => [0x2c + i, c, c.toUpperCase()]),
];
const CHARACTERS = new Map<string, { make: number[]; shift: boolean }>();
for (const [code, plain, shifted] of LAYOUT) {
  CHARACTERS.set(plain, { make: [code], shift: false });
  if (shifted !== plain) CHARACTERS.set(shifted, { make: [code], shift: true });
}
CHARACTERS.set('\n', { make: NAMED.Enter!, shift: false });
CHARACTERS.set('\r', { make: NAMED.Enter!, shift: false });
CHARACTERS.set('\t', { make: NAMED.Tab!, shift: false });
CHARACTERS.set('\x1b', { make: NAMED.Esc!, shift: false });
CHARACTERS.set('\b', { make: NAMED.Backspace!, shift: false });

/** One key press: a key's make code with the modifiers held around it. */
export interface KeyStroke {
  make: number[];
  modifiers: Modifier[];
  /** How the stroke was written, for messages. */
  label: string;
}

export class KeysError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'KeysError';
  }
}

/** The release of a key: its make code with bit 7 set on the last byte (0xe0 prefixes stay). */
function breakOf(make: number[]): number[] {
  return [...make.slice(0, -1), make[make.length - 1]! | 0x80];
}

/** Scancodes for one stroke: modifiers down, the key down and up, modifiers up in reverse order. */
export function strokeScancodes(stroke: KeyStroke): number[] {
  const codes: number[] = [];
  for (const modifier of stroke.modifiers) codes.push(...MODIFIERS[modifier]);
  codes.push(...stroke.make, ...breakOf(stroke.make));
  for (const modifier of [...stroke.modifiers].reverse()) codes.push(...breakOf([...MODIFIERS[modifier]]));
  return codes;
}

function characterStroke(char: string, modifiers: Modifier[], label: string): KeyStroke | undefined {
  // A letter with Ctrl or Alt is that letter's key (Ctrl-C, not Ctrl-Shift-C); an explicit Shift- still adds Shift.
  const lower = modifiers.length > 0 && /^[A-Z]$/.test(char) && !modifiers.includes('Shift') ? char.toLowerCase() : char;
  const key = CHARACTERS.get(lower);
  if (!key) return undefined;
  const all = key.shift && !modifiers.includes('Shift') ? [...modifiers, 'Shift' as const] : modifiers;
  return { make: key.make, modifiers: all, label };
}

/** A `<...>` group's inside: modifiers joined by '-' and a key name or one character. */
function parseNamed(inside: string, label: string): KeyStroke {
  const parts = inside.split('-');
  // `<Ctrl-->` is Ctrl with the minus key: an empty last part after a '-' means the key is '-'.
  if (parts.length > 1 && parts[parts.length - 1] === '' && parts[parts.length - 2] === '') parts.splice(-2, 2, '-');
  const key = parts.pop()!;
  const modifiers: Modifier[] = [];
  for (const part of parts) {
    const modifier = (Object.keys(MODIFIERS) as Modifier[]).find((m) => m.toLowerCase() === part.toLowerCase() || (m === 'Ctrl' && part.toLowerCase() === 'control'));
    if (!modifier) throw new KeysError(`unknown modifier '${part}' in ${label} (use Ctrl, Alt or Shift)`);
    if (!modifiers.includes(modifier)) modifiers.push(modifier);
  }
  const name = NAMES.get(key.toLowerCase());
  if (name) return { make: NAMED[name]!, modifiers, label };
  if ([...key].length === 1) {
    const stroke = characterStroke(key, modifiers, label);
    if (stroke) return stroke;
    throw new KeysError(`${label}: '${key}' is not on a US keyboard`);
  }
  throw new KeysError(`unknown key ${label} (known: ${Object.keys(NAMED).join(' ')}, Ctrl-X style modifiers; << is a literal <)`);
}

/** Parses key text (see the file comment) into strokes; throws KeysError naming what cannot be typed and where. */
export function parseKeys(text: string): KeyStroke[] {
  const strokes: KeyStroke[] = [];
  const chars = [...text];
  for (let i = 0; i < chars.length; i++) {
    const char = chars[i]!;
    if (char === '<') {
      if (chars[i + 1] === '<') {
        strokes.push(characterStroke('<', [], '<<')!);
        i++;
        continue;
      }
      const end = chars.indexOf('>', i + 2);
      const inside = end > 0 ? chars.slice(i + 1, end).join('') : '';
      if (end < 0 || inside.includes('<') || inside.length > 40) {
        throw new KeysError(`'<' at character ${i + 1} does not start a key name such as <Enter> (write << for a literal <)`);
      }
      strokes.push(parseNamed(inside, `<${inside}>`));
      i = end;
      continue;
    }
    if (char === '\\' && i + 1 < chars.length) {
      const escaped = ({ n: '\n', t: '\t', e: '\x1b', r: '\r', '\\': '\\' } as Record<string, string>)[chars[i + 1]!];
      if (escaped !== undefined) {
        strokes.push(characterStroke(escaped, [], `\\${chars[i + 1]}`)!);
        i++;
        continue;
      }
    }
    const stroke = characterStroke(char, [], JSON.stringify(char));
    if (!stroke) throw new KeysError(`character ${i + 1} (${JSON.stringify(char)}, U+${char.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}) is not on a US keyboard`);
    strokes.push(stroke);
  }
  return strokes;
}

/** The scancodes that type `text` (see parseKeys). */
export function keysToScancodes(text: string): number[] {
  return parseKeys(text).flatMap(strokeScancodes);
}

/** The parts of a browser KeyboardEvent this map reads. */
export interface KeyEventLike {
  key: string;
  ctrlKey: boolean;
  altKey: boolean;
  shiftKey: boolean;
  metaKey: boolean;
}

/**
 * Scancodes for a key pressed in the page (its `key`, so any host layout types the same characters into a
 * US-layout guest), or undefined for keys this map does not send (modifiers alone, dead keys, Meta chords).
 */
export function scancodesForKeyEvent(event: KeyEventLike): number[] | undefined {
  if (event.metaKey) return undefined;
  const modifiers: Modifier[] = [];
  if (event.ctrlKey) modifiers.push('Ctrl');
  if (event.altKey) modifiers.push('Alt');
  const name = NAMES.get(event.key.toLowerCase());
  if (name && [...event.key].length > 1) {
    // Shift matters for named keys (Shift-Tab); for characters it is already in `key`.
    if (event.shiftKey) modifiers.push('Shift');
    return strokeScancodes({ make: NAMED[name]!, modifiers, label: event.key });
  }
  if ([...event.key].length !== 1) return undefined;
  const stroke = characterStroke(event.key, modifiers, event.key);
  return stroke ? strokeScancodes(stroke) : undefined;
}
