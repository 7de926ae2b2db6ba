// Command devicemanager drives the kubelet's own device manager
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager) for aiodp's end-to-end tests.
//
// It reads one JSON command per line on stdin and answers one JSON object per line on
// stdout. The kubelet's socket is at the device manager's fixed path,
// /var/lib/kubelet/device-plugins/kubelet.sock: the Python harness runs this driver in its
// own mount namespace with a temporary directory bound there.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
)

const socketPath = "/var/lib/kubelet/device-plugins/kubelet.sock"

var kubernetesVersion = "unknown" // set by the build: -X main.kubernetesVersion=v1.x.y

type command struct {
	Op          string  `json:"op"`
	Resource    string  `json:"resource"`
	Capacity    int64   `json:"capacity"`
	Allocatable int64   `json:"allocatable"`
	Count       int64   `json:"count"`
	Pod         string  `json:"pod"`
	Timeout     float64 `json:"timeout"`
	PrebindMs   int     `json:"prebind_ms"`
	PrebindMode string  `json:"prebind_mode"`
	Repeat      int     `json:"repeat"`
}

type reply map[string]any

type driver struct {
	mu      sync.Mutex
	manager *devicemanager.ManagerImpl
	pods    []*v1.Pod
}

func (d *driver) activePods() []*v1.Pod {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*v1.Pod(nil), d.pods...)
}

func quantities(list v1.ResourceList) map[string]int64 {
	out := map[string]int64{}
	for name, q := range list {
		out[string(name)] = q.Value()
	}
	return out
}

func (d *driver) capacity() (map[string]int64, map[string]int64) {
	capacity, allocatable, _ := getCapacity(d.manager)
	return quantities(capacity), quantities(allocatable)
}

func (d *driver) handle(c command) reply {
	switch c.Op {
	case "start":
		if d.manager != nil {
			return reply{"ok": false, "error": "already started"}
		}
		if c.PrebindMs > 0 {
			// kubelet.sock exists before the kubelet serves it, for a while. "refuse": bound,
			// not listening (a plugin gets ECONNREFUSED, and listen() makes no inotify
			// event); the device manager's own bind-then-listen gap is the same race, only
			// shorter. "hang": listening, never accepting (a Register sent now gets no answer).
			if err := prebind(c.PrebindMode, time.Duration(c.PrebindMs)*time.Millisecond); err != nil {
				return reply{"ok": false, "error": err.Error()}
			}
		}
		m, err := newManager()
		if err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		start := time.Now()
		if err := startManager(m, d.activePods); err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		d.manager = m
		return reply{"ok": true, "started_ns": start.UnixNano()}
	case "stop":
		if d.manager == nil {
			return reply{"ok": false, "error": "not started"}
		}
		err := stopManager(d.manager)
		d.manager = nil
		if err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		return reply{"ok": true}
	case "capacity":
		if d.manager == nil {
			return reply{"ok": false, "error": "not started"}
		}
		capacity, allocatable := d.capacity()
		return reply{"ok": true, "capacity": capacity, "allocatable": allocatable}
	case "wait":
		// Poll the device manager (as the kubelet's node-status loop reads it) until the
		// resource has the wanted capacity and allocatable counts, or the timeout passes.
		if d.manager == nil {
			return reply{"ok": false, "error": "not started"}
		}
		deadline := time.Now().Add(time.Duration(c.Timeout * float64(time.Second)))
		for {
			capacity, allocatable := d.capacity()
			if capacity[c.Resource] == c.Capacity && allocatable[c.Resource] == c.Allocatable {
				return reply{"ok": true, "capacity": capacity, "allocatable": allocatable, "at_ns": time.Now().UnixNano()}
			}
			if time.Now().After(deadline) {
				return reply{"ok": false, "error": "timeout", "capacity": capacity, "allocatable": allocatable}
			}
			time.Sleep(time.Millisecond)
		}
	case "devices":
		// The allocatable (healthy) devices of a resource with their NUMA nodes, as the
		// kubelet keeps them from the plugin's ListAndWatch.
		if d.manager == nil {
			return reply{"ok": false, "error": "not started"}
		}
		out := map[string][]int64{}
		for id, dev := range allocatableDevices(d.manager)[c.Resource] {
			numa := []int64{}
			if dev.Topology != nil {
				for _, n := range dev.Topology.Nodes {
					numa = append(numa, n.ID)
				}
			}
			out[id] = numa
		}
		return reply{"ok": true, "devices": out}
	case "allocate":
		if d.manager == nil {
			return reply{"ok": false, "error": "not started"}
		}
		pod := &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: c.Pod, Namespace: "default", UID: types.UID("uid-" + c.Pod)},
			Spec: v1.PodSpec{Containers: []v1.Container{{
				Name: "main",
				Resources: v1.ResourceRequirements{
					Limits: v1.ResourceList{v1.ResourceName(c.Resource): *resource.NewQuantity(c.Count, resource.DecimalSI)},
				},
			}}},
		}
		d.mu.Lock()
		d.pods = append(d.pods, pod)
		d.mu.Unlock()
		ctx := context.Background()
		container := &pod.Spec.Containers[0]
		if err := allocate(ctx, d.manager, pod, container); err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		opts, err := runOptions(ctx, d.manager, pod, container)
		if err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		var ids []string
		for _, devices := range d.manager.GetDevices(string(pod.UID), container.Name) {
			for id := range devices {
				ids = append(ids, id)
			}
		}
		sort.Strings(ids)
		envs := map[string]string{}
		for _, e := range opts.Envs {
			envs[e.Name] = e.Value
		}
		var specs []string
		for _, s := range opts.Devices {
			specs = append(specs, s.PathOnHost)
		}
		var cdi []string
		for _, n := range opts.CDIDevices {
			cdi = append(cdi, n.Name)
		}
		return reply{"ok": true, "devices": ids, "envs": envs, "specs": specs, "cdi": cdi, "annotations": opts.Annotations}
	case "serve_floor":
		if err := serveFloor(c.Resource); err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		return reply{"ok": true}
	case "allocate_many":
		// c.Count devices of c.Resource for Repeat pods in turn, each freed before the next:
		// the device manager's whole path (GetPreferredAllocation, Allocate, bookkeeping),
		// timed pod by pod
		if d.manager == nil {
			return reply{"ok": false, "error": "not started"}
		}
		var took []int64
		ctx := context.Background()
		for i := 0; i < c.Repeat; i++ {
			pod := &v1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%d", c.Pod, i), Namespace: "default",
					UID: types.UID(fmt.Sprintf("uid-%s-%d", c.Pod, i))},
				Spec: v1.PodSpec{Containers: []v1.Container{{
					Name: "main",
					Resources: v1.ResourceRequirements{
						Limits: v1.ResourceList{v1.ResourceName(c.Resource): *resource.NewQuantity(c.Count, resource.DecimalSI)},
					},
				}}},
			}
			d.mu.Lock()
			d.pods = []*v1.Pod{pod} // the previous pod is gone: its devices are free again
			d.mu.Unlock()
			start := time.Now()
			if err := allocate(ctx, d.manager, pod, &pod.Spec.Containers[0]); err != nil {
				return reply{"ok": false, "error": err.Error()}
			}
			took = append(took, time.Since(start).Nanoseconds())
		}
		d.mu.Lock()
		d.pods = nil
		d.mu.Unlock()
		return reply{"ok": true, "took_ns": took}
	case "exit":
		os.Exit(0)
	}
	return reply{"ok": false, "error": fmt.Sprintf("unknown op %q", c.Op)}
}

func prebind(mode string, hold time.Duration) error {
	_ = os.Remove(socketPath)
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: socketPath}); err != nil {
		return err
	}
	if mode == "hang" {
		if err := syscall.Listen(fd, 16); err != nil {
			return err
		}
	}
	time.Sleep(hold)
	return nil
}

func main() {
	d := &driver{}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	_ = out.Encode(reply{"ok": true, "kubernetes": kubernetesVersion, "socket": socketPath})
	for in.Scan() {
		line := strings.TrimSpace(in.Text())
		if line == "" {
			continue
		}
		var c command
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			_ = out.Encode(reply{"ok": false, "error": err.Error()})
			continue
		}
		_ = out.Encode(d.handle(c))
	}
}
