/**
 * The scancode map shared by `--send-keys`, the library's sendKeys and the tab's Screen view, against the PC's
 * scancode set 1 as IBM documented it (make codes; break = make | 0x80; extended keys behind 0xE0).
 */
import { describe, expect, test } from 'vitest';
import { KeysError, keysToScancodes, parseKeys, scancodesForKeyEvent } from '../../src/v86/keyboard.js';

const LSHIFT = 0x2a;
const CTRL = 0x1d;
const ALT = 0x38;
/** A plain key press: make then break. */
const tap = (make: number) => [make, make | 0x80];
const shifted = (make: number) => [LSHIFT, make, make | 0x80, LSHIFT | 0x80];

describe('key text to scancodes (US layout, set 1)', () => {
  test('letters, digits, Shift for capitals and symbols', () => {
    expect(keysToScancodes('echo hi')).toEqual([...tap(0x12), ...tap(0x2e), ...tap(0x23), ...tap(0x18), ...tap(0x39), ...tap(0x23), ...tap(0x17)]);
    expect(keysToScancodes('A')).toEqual(shifted(0x1e));
    expect(keysToScancodes('1!')).toEqual([...tap(0x02), ...shifted(0x02)]);
    expect(keysToScancodes('$_{}|~"?')).toEqual([...shifted(0x05), ...shifted(0x0c), ...shifted(0x1a), ...shifted(0x1b), ...shifted(0x2b), ...shifted(0x29), ...shifted(0x28), ...shifted(0x35)]);
    expect(keysToScancodes("-=[]\\;',./`")).toEqual([0x0c, 0x0d, 0x1a, 0x1b, 0x2b, 0x27, 0x28, 0x33, 0x34, 0x35, 0x29].flatMap(tap));
  });

  test('Enter from a newline or backslash-n; other escapes', () => {
    expect(keysToScancodes('\n')).toEqual(tap(0x1c));
    expect(keysToScancodes('\\n')).toEqual(tap(0x1c));
    expect(keysToScancodes('\\t\\e\\\\')).toEqual([...tap(0x0f), ...tap(0x01), ...tap(0x2b)]);
    // A backslash before anything else is a backslash.
    expect(keysToScancodes('\\x')).toEqual([...tap(0x2b), ...tap(0x2d)]);
  });

  test('named keys as the issue spells them, extended keys with 0xE0', () => {
    expect(keysToScancodes('<Enter><Esc><Tab><Backspace>')).toEqual([0x1c, 0x01, 0x0f, 0x0e].flatMap(tap));
    expect(keysToScancodes('<Up><Down><Left><Right>')).toEqual([[0xe0, 0x48, 0xe0, 0xc8], [0xe0, 0x50, 0xe0, 0xd0], [0xe0, 0x4b, 0xe0, 0xcb], [0xe0, 0x4d, 0xe0, 0xcd]].flat());
    expect(keysToScancodes('<Home><End><PgUp><PgDn>')).toEqual([[0xe0, 0x47, 0xe0, 0xc7], [0xe0, 0x4f, 0xe0, 0xcf], [0xe0, 0x49, 0xe0, 0xc9], [0xe0, 0x51, 0xe0, 0xd1]].flat());
    expect(keysToScancodes('<F1><F10><F11><F12>')).toEqual([0x3b, 0x44, 0x57, 0x58].flatMap(tap));
    expect(keysToScancodes('<enter><ESCAPE>')).toEqual([0x1c, 0x01].flatMap(tap));
  });

  test('modifiers: Ctrl-X, Alt-F2, Shift-Tab, Ctrl-Alt-Delete', () => {
    expect(keysToScancodes('<Ctrl-X>')).toEqual([CTRL, 0x2d, 0xad, CTRL | 0x80]);
    expect(keysToScancodes('<Ctrl-c>')).toEqual([CTRL, 0x2e, 0xae, CTRL | 0x80]);
    expect(keysToScancodes('<Alt-F2>')).toEqual([ALT, 0x3c, 0xbc, ALT | 0x80]);
    expect(keysToScancodes('<Shift-Tab>')).toEqual([LSHIFT, 0x0f, 0x8f, LSHIFT | 0x80]);
    expect(keysToScancodes('<Ctrl-Alt-Delete>')).toEqual([CTRL, ALT, 0xe0, 0x53, 0xe0, 0xd3, ALT | 0x80, CTRL | 0x80]);
  });

  test('<< is a literal <; a lone < or an unknown name is refused by name and position', () => {
    expect(keysToScancodes('a<<b')).toEqual([...tap(0x1e), ...shifted(0x33), ...tap(0x30)]);
    expect(() => parseKeys('a < b')).toThrow(KeysError);
    expect(() => parseKeys('a < b')).toThrow("'<' at character 3 does not start a key name");
    expect(() => parseKeys('<Enterr>')).toThrow('unknown key <Enterr>');
    expect(() => parseKeys('<Meta-x>')).toThrow("unknown modifier 'Meta' in <Meta-x>");
    expect(() => parseKeys('é')).toThrow('character 1 ("é", U+00E9) is not on a US keyboard');
  });
});

describe('browser key events to scancodes (the tab)', () => {
  const event = (key: string, mods: Partial<{ ctrlKey: boolean; altKey: boolean; shiftKey: boolean; metaKey: boolean }> = {}) =>
    ({ key, ctrlKey: false, altKey: false, shiftKey: false, metaKey: false, ...mods });

  test('characters type as themselves, whatever the host layout produced them', () => {
    expect(scancodesForKeyEvent(event('e'))).toEqual(tap(0x12));
    expect(scancodesForKeyEvent(event('E', { shiftKey: true }))).toEqual(shifted(0x12));
    expect(scancodesForKeyEvent(event('#', { shiftKey: true }))).toEqual(shifted(0x04));
    expect(scancodesForKeyEvent(event(' '))).toEqual(tap(0x39));
  });

  test('named keys, Ctrl and Alt chords; modifiers alone and Meta chords send nothing', () => {
    expect(scancodesForKeyEvent(event('Enter'))).toEqual(tap(0x1c));
    expect(scancodesForKeyEvent(event('ArrowUp'))).toEqual([0xe0, 0x48, 0xe0, 0xc8]);
    expect(scancodesForKeyEvent(event('Tab', { shiftKey: true }))).toEqual([LSHIFT, 0x0f, 0x8f, LSHIFT | 0x80]);
    expect(scancodesForKeyEvent(event('c', { ctrlKey: true }))).toEqual([CTRL, 0x2e, 0xae, CTRL | 0x80]);
    expect(scancodesForKeyEvent(event('F2', { altKey: true }))).toEqual([ALT, 0x3c, 0xbc, ALT | 0x80]);
    expect(scancodesForKeyEvent(event('Shift', { shiftKey: true }))).toBeUndefined();
    expect(scancodesForKeyEvent(event('Dead'))).toBeUndefined();
    expect(scancodesForKeyEvent(event('v', { metaKey: true }))).toBeUndefined();
  });
});
