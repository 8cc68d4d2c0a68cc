package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// results is the part of bench/live's results file the plots use.
type results struct {
	Settings struct {
		Short bool `json:"short"`
	} `json:"settings"`
	Samples []sample `json:"samples"`
}

type sample struct {
	CIDRs     int    `json:"cidrs"`
	Dataplane string `json:"dataplane"`
	NewFlows  struct {
		Sustained float64 `json:"sustained"`
		Max       float64 `json:"max"`
	} `json:"newFlows"`
	Connect struct {
		Quantiles []float64 `json:"quantiles"`
	} `json:"connect"`
}

// dataplane styles, in legend order.
var styles = []struct {
	name, label string
	color       color.Color
	shape       draw.GlyphDrawer
}{
	{"agent", "nfmasq agent (NFQUEUE)", color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}, draw.CircleGlyph{}},
	{"chain", "kernel: ip-masq-agent chain", color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}, draw.SquareGlyph{}},
	{"ipset", "kernel: ipset hash:net", color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}, draw.TriangleGlyph{}},
}

func main() {
	in := flag.String("in", "live.json", "bench/live results file")
	dir := flag.String("dir", ".", "directory for newflows.png and connect-cdf.png")
	cdfCIDRs := flag.Int("cdf-cidrs", 5000, "CIDR count whose connect times the CDF shows (the largest measured when absent)")
	flag.Parse()
	if err := run(*in, *dir, *cdfCIDRs); err != nil {
		fmt.Fprintln(os.Stderr, "plot:", err)
		os.Exit(1)
	}
}

func run(in, dir string, cdfCIDRs int) error {
	data, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	var r results
	if err := json.Unmarshal(data, &r); err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	if len(r.Samples) == 0 {
		return fmt.Errorf("%s holds no samples", in)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	note := ""
	if r.Settings.Short {
		note = " (-short run: numbers mean nothing)"
	}
	nf, err := newFlowsPlot(r.Samples, note)
	if err != nil {
		return err
	}
	if err := nf.Save(7*vg.Inch, 4.5*vg.Inch, filepath.Join(dir, "newflows.png")); err != nil {
		return err
	}
	cdf, err := connectCDF(r.Samples, cdfCIDRs, note)
	if err != nil {
		return err
	}
	return cdf.Save(7*vg.Inch, 4.5*vg.Inch, filepath.Join(dir, "connect-cdf.png"))
}

// newFlowsPlot draws the median sustained rate (solid) and the median
// unpaced rate (dashed) per dataplane against the CIDR count.
func newFlowsPlot(samples []sample, note string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "New flows per second, every flow decided" + note
	p.X.Label.Text = "non-masquerade CIDRs"
	p.Y.Label.Text = "new flows/s (median)"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = countTicks(samples)
	p.Y.Min = 0
	p.Legend.Top = true
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	p.Add(plotter.NewGrid())
	top := 0.0
	for _, st := range styles {
		sustained, unpaced := medians(samples, st.name)
		for _, xy := range append(sustained, unpaced...) {
			top = math.Max(top, xy.Y)
		}
		if len(sustained) == 0 {
			continue
		}
		line, points, err := plotter.NewLinePoints(sustained)
		if err != nil {
			return nil, err
		}
		line.Color, points.Color, points.Shape = st.color, st.color, st.shape
		line.Width = vg.Points(1.5)
		p.Add(line, points)
		p.Legend.Add(st.label+", sustained", line, points)
		dashed, err := plotter.NewLine(unpaced)
		if err != nil {
			return nil, err
		}
		dashed.Color, dashed.Dashes = st.color, []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(dashed)
		p.Legend.Add(st.label+", unpaced", dashed)
	}
	p.Y.Max = 1.5 * top // room for the legend above the lines
	return p, nil
}

// countTicks labels the CIDR axis at the counts measured.
func countTicks(samples []sample) plot.ConstantTicks {
	var counts []int
	for _, s := range samples {
		if !slices.Contains(counts, s.CIDRs) {
			counts = append(counts, s.CIDRs)
		}
	}
	slices.Sort(counts)
	ticks := make(plot.ConstantTicks, len(counts))
	for i, n := range counts {
		ticks[i] = plot.Tick{Value: float64(n), Label: fmt.Sprint(n)}
	}
	return ticks
}

// medians returns, per CIDR count, the median sustained and unpaced rates.
func medians(samples []sample, dp string) (sustained, unpaced plotter.XYs) {
	by := map[int][]sample{}
	for _, s := range samples {
		if s.Dataplane == dp {
			by[s.CIDRs] = append(by[s.CIDRs], s)
		}
	}
	counts := make([]int, 0, len(by))
	for n := range by {
		counts = append(counts, n)
	}
	slices.Sort(counts)
	for _, n := range counts {
		var a, b []float64
		for _, s := range by[n] {
			a = append(a, s.NewFlows.Sustained)
			b = append(b, s.NewFlows.Max)
		}
		sustained = append(sustained, plotter.XY{X: float64(n), Y: median(a)})
		unpaced = append(unpaced, plotter.XY{X: float64(n), Y: median(b)})
	}
	return sustained, unpaced
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

// connectCDF draws, per dataplane, the connect-time distribution at one
// CIDR count: each repetition's quantiles averaged level by level.
func connectCDF(samples []sample, cidrs int, note string) (*plot.Plot, error) {
	has := func(n int) bool {
		return slices.ContainsFunc(samples, func(s sample) bool { return s.CIDRs == n && len(s.Connect.Quantiles) > 0 })
	}
	if !has(cidrs) {
		cidrs = 0
		for _, s := range samples {
			if len(s.Connect.Quantiles) > 0 {
				cidrs = max(cidrs, s.CIDRs)
			}
		}
		if cidrs == 0 {
			return nil, errors.New("no connect times in the results")
		}
	}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("TCP connect time through the node, %d non-masquerade CIDRs%s", cidrs, note)
	p.X.Label.Text = "connect time (µs)"
	p.Y.Label.Text = "fraction of connects"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Y.Min, p.Y.Max = 0, 1
	p.Legend.Top, p.Legend.Left = false, false // bottom right: the curves are near 1 there
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	p.Add(plotter.NewGrid())
	for _, st := range styles {
		var reps [][]float64
		for _, s := range samples {
			if s.Dataplane == st.name && s.CIDRs == cidrs && len(s.Connect.Quantiles) > 0 {
				reps = append(reps, s.Connect.Quantiles)
			}
		}
		if len(reps) == 0 {
			continue
		}
		n := len(reps[0])
		xy := make(plotter.XYs, 0, n)
		for i := range n {
			var sum float64
			for _, q := range reps {
				sum += q[min(i, len(q)-1)]
			}
			x := math.Max(sum/float64(len(reps)), 0.1) // log scale: no zero
			xy = append(xy, plotter.XY{X: x, Y: float64(i) / float64(n-1)})
		}
		line, err := plotter.NewLine(xy)
		if err != nil {
			return nil, err
		}
		line.Color, line.Width = st.color, vg.Points(1.5)
		p.Add(line)
		p.Legend.Add(st.label, line)
	}
	return p, nil
}
