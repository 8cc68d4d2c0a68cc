package mark_test

import (
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/mark"
)

func TestParseMarkMask(t *testing.T) {
	tests := []struct {
		in      string
		want    mark.Layout
		wantErr string
	}{
		{in: "0x3000", want: mark.Default},
		{in: "12288", want: mark.Default},
		{in: "0x3", want: mark.Layout{Mask: 3, Masquerade: 1, Passthrough: 2, Fallback: 3}},
		{in: "0x1100", want: mark.Layout{Mask: 0x1100, Masquerade: 0x100, Passthrough: 0x1000, Fallback: 0x1100}},
		{in: "0x700", want: mark.Layout{Mask: 0x700, Masquerade: 0x100, Passthrough: 0x200, Fallback: 0x300}},
		{in: "0x1000", wantErr: "fewer than 2 bits"},
		{in: "0", wantErr: "fewer than 2 bits"},
		{in: "0x6000", wantErr: "kube-proxy"},
		{in: "0x8001", wantErr: "kube-proxy"},
		{in: "0x30000", wantErr: "Calico"},
		{in: "0x80000001", wantErr: "Calico"},
		{in: "mask", wantErr: "invalid syntax"},
		{in: "0x100000000", wantErr: "out of range"},
	}
	for _, tt := range tests {
		got, err := mark.Parse(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("mark.Parse(%q) error = %v, want one mentioning %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("mark.Parse(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
	if m, err := mark.FromMask(mark.DefaultMask); err != nil || m != mark.Default {
		t.Errorf("mark.FromMask(mark.DefaultMask) = %+v, %v; want mark.Default", m, err)
	}
}

func TestClassify(t *testing.T) {
	custom := mark.Layout{Mask: 0x30000, Masquerade: 0x10000, Passthrough: 0x20000, Fallback: 0x30000}
	tests := []struct {
		layout mark.Layout
		mark   uint32
		want   mark.Decider
	}{
		{mark.Default, 0, mark.Undecided},
		{mark.Default, 0x4000, mark.Undecided}, // kube-proxy's bit only
		{mark.Default, 0x1000, mark.AgentMasquerade},
		{mark.Default, 0xffff1000, mark.AgentMasquerade}, // Calico's bits do not matter
		{mark.Default, 0x2000, mark.AgentPassthrough},
		{mark.Default, 0x3000, mark.KernelFallback},
		{mark.Default, 0x7000, mark.KernelFallback},
		{custom, 0x1000, mark.Undecided},
		{custom, 0x20000, mark.AgentPassthrough},
		{mark.Layout{Mask: 0x7000, Masquerade: 0x1000, Passthrough: 0x2000, Fallback: 0x3000}, 0x4000, mark.UnknownMark},
	}
	for _, tt := range tests {
		if got := tt.layout.Classify(tt.mark); got != tt.want {
			t.Errorf("%+v.Classify(%#x) = %v, want %v", tt.layout, tt.mark, got, tt.want)
		}
	}
	if !mark.AgentMasquerade.ByAgent() || !mark.AgentPassthrough.ByAgent() || mark.KernelFallback.ByAgent() || mark.Undecided.ByAgent() {
		t.Error("ByAgent is wrong")
	}
	for d := range mark.UnknownMark + 1 {
		if d.String() == "" {
			t.Errorf("mark.Decider %d has no name", d)
		}
	}
}

func TestValidateTable(t *testing.T) {
	tests := []struct {
		layout mark.Layout
		ok     bool
	}{
		{mark.Default, true},
		{mark.Layout{Mask: 0x30000, Masquerade: 0x10000, Passthrough: 0x20000, Fallback: 0x30000}, true},
		{mark.Layout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x1000, Fallback: 0x3000}, false},
		{mark.Layout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x2000, Fallback: 0}, false},
		{mark.Layout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x2000, Fallback: 0x4000}, false},
	}
	for _, tt := range tests {
		if err := tt.layout.Validate(); (err == nil) != tt.ok {
			t.Errorf("%+v.Validate() = %v, want ok=%v", tt.layout, err, tt.ok)
		}
	}
}

func TestMarksValidate(t *testing.T) {
	tests := []struct {
		m       mark.Layout
		wantErr string
	}{
		{mark.Default, ""},
		{mark.Layout{Mask: 0x3000, Masquerade: 0x1000}, "non-zero"},
		{mark.Layout{Masquerade: 1, Passthrough: 2}, "fewer than 2 bits"},
		{mark.Layout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x4000, Fallback: 0x3000}, "inside the mask"},
		{mark.Layout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x1000}, "both"},
	}
	for _, tt := range tests {
		err := tt.m.Validate()
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("%+v: unexpected error %v", tt.m, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("%+v: error %v, want one containing %q", tt.m, err, tt.wantErr)
		}
	}
}
